"""configurator.py — a CLI's defaults in one dict, overridden from the command line.

    DEFAULTS = dict(init="smollm2-135m-instruct", seq_len=512, compile=False)
    config = configure(DEFAULTS, sys.argv[1:])     # python eval.py --seq_len=1024 --compile

Every flag is --key=value with the type of its default: a bool takes true/false/1/0 (or
--key alone for true), a tuple/list takes comma-separated items, a None default takes an
int, a float, "none", or else the string as is. A wrong key or value raises ValueError
with a message naming the fix; --help prints the defaults and exits.
"""
import sys

BOOLS = {"true": True, "1": True, "false": False, "0": False}
KIND_NAMES = {int: "an integer", float: "a number"}


def parse_value(key: str, text: str, default):
    """text -> a value of the default's type."""
    if isinstance(default, bool):
        if text.lower() not in BOOLS:
            raise ValueError(f"--{key} is a bool: use --{key}=true or --{key}=false, not {text!r}")
        return BOOLS[text.lower()]
    if isinstance(default, (tuple, list)):
        items = [t for t in text.split(",") if t]
        return type(default)(parse_value(key, t, default[0]) if default else t for t in items)
    if default is None:
        if text.lower() == "none":
            return None
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        return text
    try:
        return type(default)(text)
    except ValueError:
        kind = KIND_NAMES.get(type(default), type(default).__name__)
        raise ValueError(f"--{key} needs {kind}, got {text!r}") from None


def configure(defaults: dict, argv) -> dict:
    """A copy of defaults with every --key=value of argv applied."""
    config = dict(defaults)
    for arg in argv:
        if arg in ("-h", "--help"):
            print("options (default values):\n" + "\n".join(f"  --{k}={v}" for k, v in defaults.items()))
            sys.exit(0)
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}: options are written --key=value")
        key, eq, text = arg[2:].partition("=")
        if key not in defaults:
            raise ValueError(f"unknown option --{key}; valid options: "
                             + ", ".join(f"--{k}" for k in defaults))
        if not eq:
            if not isinstance(defaults[key], bool):
                raise ValueError(f"--{key} needs a value: --{key}=...")
            text = "true"
        config[key] = parse_value(key, text, defaults[key])
    return config
