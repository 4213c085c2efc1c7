"""The training suite: tiny-model tasks of several families (`tasks`) and the runner that judges every training path
on them by its frontier (`run`): `python -m benchmarks.suite --help`."""
