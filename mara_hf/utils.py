"""Small utilities shared by several parts of mara-hf: atomic saving, a thread that returns its result, token ids
given in any of the forms transformers uses."""

import os
import shutil
import tempfile
import threading


def save_atomically(agent, output_dir: str, **save_kwargs) -> None:
    """save_pretrained into a sibling temp folder, then rename: a crash never leaves a half-written agent."""
    output_dir = os.path.abspath(output_dir)
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-mara-", dir=parent)
    try:
        if os.path.isfile(os.path.join(output_dir, "README.md")):  # keep what a person wrote in the card
            shutil.copy(os.path.join(output_dir, "README.md"), tmp)
        save_kwargs.setdefault("repo_id", output_dir)
        agent.save_pretrained(tmp, **save_kwargs)
        if os.path.isdir(output_dir):
            old = tempfile.mkdtemp(prefix=".old-mara-", dir=parent)
            os.replace(output_dir, os.path.join(old, "agent"))
            os.replace(tmp, output_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class InBackground:
    """Run `fn()` in a thread now; `join()` waits and returns its result, or raises what it raised."""

    def __init__(self, fn):
        self._result, self._error = None, None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn):
        try:
            self._result = fn()
        except BaseException as err:  # handed to the caller of join
            self._error = err

    def join(self):
        interrupted = None
        while True:  # a Ctrl-C or SIGTERM while waiting must not leave the thread running behind the caller
            try:
                self._thread.join()
                break
            except KeyboardInterrupt as err:
                interrupted = err
        if self._error is not None:
            raise self._error
        if interrupted is not None:
            raise interrupted
        return self._result


def token_ids(tokens) -> list[int]:
    """Token ids given as None, one id, a list or a tensor (an `eos_token_id`, say), as a list of ints."""
    if tokens is None:
        return []
    if hasattr(tokens, "tolist"):
        tokens = tokens.tolist()
    return [int(tokens)] if isinstance(tokens, int) else [int(t) for t in tokens]
