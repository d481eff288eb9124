"""The suite's own diagnostics: what a hanging test prints before pytest-timeout fails it."""

import time


def test_busy_ray_worker_stacks_show_where_a_task_is(ray_local):
    """A task stuck in a function: the dump names the task and the function it is in; idle workers are left out."""
    from tests.conftest import busy_ray_worker_stacks

    @ray_local.remote(num_cpus=0)
    def waits_for_nothing_in_particular() -> None:
        time.sleep(60)

    ref = waits_for_nothing_in_particular.remote()
    try:
        deadline = time.monotonic() + 30
        stacks = ""
        while "waits_for_nothing_in_particular" not in stacks and time.monotonic() < deadline:
            time.sleep(0.5)  # until its worker has started and runs it
            stacks = busy_ray_worker_stacks()
        assert "--- ray::" in stacks and "waits_for_nothing_in_particular" in stacks, stacks
        assert "ray::IDLE" not in stacks and "ray::DashboardAgent" not in stacks
    finally:
        ray_local.cancel(ref, force=True)
