"""Errors that tell the user what went wrong and how to fix it.

Every error the engine raises on bad input is an :class:`ActAvatarError`: its message names the problem and
then the fix, so the same text works in a terminal, in a ComfyUI error dialog and in an HTTP 400 answer.
"""

from __future__ import annotations


class ActAvatarError(ValueError):
    """Bad input or state, with a human-readable problem and fix."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem.rstrip()
        self.fix = fix.rstrip() if fix else None
        super().__init__(self.problem if not self.fix else f"{self.problem} Fix: {self.fix}")


class PhaseScriptError(ActAvatarError):
    """A phase script that cannot be parsed or violates the rules."""


class AudioInputError(ActAvatarError):
    """Audio that cannot be decoded, is empty, silent or has an unusable sample rate."""


class ImageInputError(ActAvatarError):
    """A reference image that cannot be read or has the wrong shape."""


class SizeError(ActAvatarError):
    """Width, height or frame count that the VAE and patch strides do not allow."""


class ClipTooLongError(SizeError):
    """A clip with more frames than the model's rotary position table holds (see :mod:`actavatar_core.limits`)."""


class CliInputError(ActAvatarError):
    """A command-line option with a value the command cannot use (out of range, wrong kind of path)."""


class WeightsError(ActAvatarError):
    """A weights file of the wrong kind, with missing keys, or in an unsafe format."""


class OutputPathError(ActAvatarError):
    """An output path that would escape the allowed folder or overwrite something it should not."""


class GenerationCancelled(RuntimeError):
    """The caller asked to stop; no partial output was written."""
