"""The shapes task: a synthetic world whose answers can be checked (the trained `demo` preset's
task, molmo-eval's held-out set and the task part of the quality gates). Torch-free."""
