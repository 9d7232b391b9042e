"""One exception hierarchy for every failure a user can cause or meet.

Core modules raise these; the CLI turns each into one ``Error: ...`` line on
stderr and the exit code below. Wrap lower-level exceptions with
``raise SomeError(...) from exc`` so ``--debug`` still shows the cause.
"""

from __future__ import annotations


def one_line(text: object) -> str:
    """Collapse a reason to one line: an error is printed as exactly one."""
    return " ".join(str(text).split())


def human_size(n: int) -> str:
    """A byte count in messages: 50 MiB for the default caps; small ones (tests, embedded
    use) in KiB or bytes."""
    if n >= 2**20:
        return f"{n / 2**20:g} MiB"
    return f"{n / 2**10:g} KiB" if n >= 2**10 else f"{n} bytes"


class VlmduoError(Exception):
    """A failure explained in one line, with an optional hint for the next step."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(VlmduoError):
    """The command line asked for something impossible (bad option combination)."""

    exit_code = 2


class ModelError(VlmduoError):
    """A model or projector file is missing, not GGUF, truncated or unusable."""


class ProjectorMismatchError(ModelError):
    """The mmproj projects to a width the language model does not have."""


class UnknownModelError(ModelError):
    """A name that is neither in the registry nor a path to a .gguf file."""


class RegistryError(VlmduoError):
    """A models.toml entry is malformed."""


class ImageError(VlmduoError):
    """The image is missing, unreadable, not an image, too large or unreachable."""


class ContextOverflowError(VlmduoError):
    """Prompt plus image (plus generation) does not fit the context window."""


class EngineError(VlmduoError):
    """llama.cpp reported a failure (non-zero return code)."""


class Cancelled(VlmduoError):
    """The work was cancelled (Ctrl-C, the other agent failed, or a confident answer)."""

    exit_code = 130


class DownloadError(VlmduoError):
    """A download from the Hugging Face Hub failed."""


class OfflineError(DownloadError):
    """Offline mode is on and the files are not in the cache."""


class ChecksumError(DownloadError):
    """A downloaded file's sha256 differs from the registry's pin."""


class DiskSpaceError(DownloadError):
    """Not enough free disk space for a download."""


class DatasetError(VlmduoError):
    """An evaluation dataset cannot be read."""


class RemoteError(VlmduoError):
    """A model server (vLLM, SGLang, llama-server, Ollama) failed, refused or is unreachable."""

    def __init__(self, message: str, *, hint: str | None = None, status: int | None = None) -> None:
        super().__init__(message, hint=hint)
        self.status = status  # the HTTP status when the server answered with an error
