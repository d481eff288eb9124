"""Ray helpers: a task's own error comes back as itself, with its message and no remote traceback."""

from __future__ import annotations

import pytest

from dataengine.core import raytools
from dataengine.io.inputs import InputError


def _fails(message: str) -> None:
    raise InputError(message)


def test_a_tasks_error_is_raised_as_itself(ray_local):
    ref = ray_local.remote(_fails).remote("input.url_col: column 'link' not found in in.csv")
    with pytest.raises(InputError) as caught:
        raytools.get(ref)
    assert str(caught.value) == "input.url_col: column 'link' not found in in.csv"
    assert raytools.get(ray_local.remote(lambda: 7).remote()) == 7

