"""YAML files people write (rule files, the inference config), read with one-line errors that name the file,
the line and what is wrong: missing, a folder, unreadable, not UTF-8, not YAML."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def load_yaml(path: str | Path, loader: type[yaml.SafeLoader] = yaml.SafeLoader) -> Any:
    """The document in ``path``; ValueError with a one-line message when it cannot be read or parsed."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{p} is a folder, not a file") from None
    except PermissionError:
        raise ValueError(f"{p}: permission denied; make it readable by the user gpufleet runs as") from None
    except OSError as exc:
        raise ValueError(f"cannot read {p}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:  # found by fuzzing: a binary file crashed the rule loader
        raise ValueError(f"{p}: not UTF-8 text (byte {exc.start}); these files are UTF-8 YAML") from None
    try:
        return yaml.load(text, Loader=loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(p)
        what = " ".join(x for x in (exc.problem, exc.context) if x)
        raise ValueError(f"{where}: not valid YAML: {what}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{p}: not valid YAML: {' '.join(str(exc).split())}") from None
