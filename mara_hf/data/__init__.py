"""Prompts: prompt sets by spec (files, public sets by name, Hub datasets) and the one prompt encoder."""

from .encoding import encode_prompts, format_prompts
from .prompts import load_prompts, parse_prompt_spec

__all__ = ["encode_prompts", "format_prompts", "load_prompts", "parse_prompt_spec"]
