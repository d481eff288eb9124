"""Evaluation of trained models: held-out loss and perplexity, and the benchmark a spec names (a
registered plugin, such as the test bed's VQA benchmark); `train_then_eval` joins trainer and evaluator."""
