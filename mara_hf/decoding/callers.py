"""The transformers `generate` call that runs MARA, found among the callers.

A logits processor is handed only `(input_ids, scores)`; how the call decodes (its loop, generation config, the
processors after MARA, its streamer) lives in the frames of the transformers functions that call it.
"""

import sys


def transformers_frame(*names: str):
    """The innermost caller frame of a transformers function named one of `names`, or None."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name in names and frame.f_globals.get("__name__", "").startswith("transformers."):
            return frame
        frame = frame.f_back
    return None
