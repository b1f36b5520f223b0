"""segclip.runtime.errors: every runtime error is a SegclipError and the fitting builtin."""

from __future__ import annotations

import pytest

from segclip.errors import SegclipError
from segclip.runtime import errors


@pytest.mark.parametrize("cls, builtin", [
    (errors.BundleError, ValueError), (errors.TokenizerError, ValueError),
    (errors.LabelFileError, ValueError), (errors.ImageError, ValueError),
    (errors.EngineError, ValueError), (errors.BackendUnavailableError, ImportError),
    (errors.OutputError, OSError),
])
def test_hierarchy(cls, builtin):
    assert issubclass(cls, errors.RuntimeSegclipError)
    assert issubclass(cls, SegclipError) and issubclass(cls, builtin)
