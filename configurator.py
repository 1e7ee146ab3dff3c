"""configurator.py — a CLI's defaults in one dict, overridden from the command line.

    DEFAULTS = dict(init="smollm2-135m-instruct", seq_len=512, compile=False)
    config = configure(DEFAULTS, sys.argv[1:])     # python evaluate.py --seq_len 1024 --json

Every flag is --key=value or --key value, with the type of its default: a bool takes
true/false/1/0 (or --key alone for true), a tuple/list takes comma-separated items, a None
default takes an int, a float, "none", or else the string as is; a number also reads "none"
as None, which its Range must allow. A wrong key or value raises ValueError with a message
naming the fix; --help prints the defaults and exits.

check_ranges(config, RANGES) is the other half of a script's input checking: every numeric
flag has a Range, and a value outside it is an error naming the flag and the range.
run_main(main) is a script's last line: such an error ends it with the message alone.
"""
import math
import sys
from dataclasses import dataclass

BOOLS = {"true": True, "1": True, "false": False, "0": False}
KIND_NAMES = {int: "an integer", float: "a number"}


def run_main(main):
    """A script's entry: main(sys.argv[1:]). A ValueError is input the user can fix (a flag, a
    file; load_weights.LoadError is one): the script ends with its message, not a traceback."""
    try:
        main(sys.argv[1:])
    except ValueError as e:
        sys.exit(f"error: {e}")


def parse_value(key: str, text: str, default):
    """text -> a value of the default's type."""
    if isinstance(default, bool):
        if text.lower() not in BOOLS:
            raise ValueError(f"--{key} is a bool: use --{key}=true or --{key}=false, not {text!r}")
        return BOOLS[text.lower()]
    if isinstance(default, (tuple, list)):
        items = [t for t in text.split(",") if t]
        return type(default)(parse_value(key, t, default[0]) if default else t for t in items)
    if text.lower() == "none" and (default is None or isinstance(default, (int, float))):
        return None                                      # a number's Range says whether None is valid
    if default is None:
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


def overrides(defaults: dict, argv) -> dict:
    """{key: value} of the flags argv sets, in order; --key=value and --key value alike.

    A bool flag takes the next argument only when it reads as a bool (--json false); alone it
    means true. Any other flag takes the next argument unless that is another flag, so a
    forgotten value is an error, not a silent swallow (a value that starts with -- needs the
    = form: --prompt=--x; a negative number does not: --seed -1 reads as -1).
    """
    given, args = {}, list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help"):
            print("options (default values; --key=value or --key value):\n"
                  + "\n".join(f"  --{k}={v}" for k, v in defaults.items()))
            sys.exit(0)
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}: options are written --key=value or --key value")
        key, eq, text = arg[2:].partition("=")
        if key not in defaults:
            raise ValueError(f"unknown option --{key}; valid options: "
                             + ", ".join(f"--{k}" for k in defaults))
        if not eq:
            if isinstance(defaults[key], bool):
                text = args.pop(0) if args and args[0].lower() in BOOLS else "true"
            elif args and not args[0].startswith("--"):
                text = args.pop(0)
            else:
                raise ValueError(f"--{key} needs a value: --{key}=... or --{key} ...")
        given[key] = parse_value(key, text, defaults[key])
    return given


def configure(defaults: dict, argv) -> dict:
    """A copy of defaults with every flag of argv applied."""
    return dict(defaults, **overrides(defaults, argv))


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric flag: lo <= v <= hi (lo < v with open_lo), and None (--key=none)
    only where or_none says so."""
    lo: float = -math.inf
    hi: float = math.inf
    open_lo: bool = False
    or_none: bool = False

    def __contains__(self, v) -> bool:
        if v is None:
            return self.or_none
        return math.isfinite(v) and (self.lo < v if self.open_lo else self.lo <= v) and v <= self.hi

    def __str__(self):
        if self.hi == math.inf:
            text = f"{'>' if self.open_lo else '>='} {self.lo:g}"
        else:
            text = f"in {'(' if self.open_lo else '['}{self.lo:g}, {self.hi:g}]"
        return text + (" or none" if self.or_none else "")


AT_LEAST_1, AT_LEAST_0, POSITIVE, FRACTION = Range(1), Range(0), Range(0, open_lo=True), Range(0, 1)


def check_ranges(config: dict, ranges: dict):
    """Every numeric flag named in ranges (each item of a tuple flag) lies in its Range."""
    for key, valid in ranges.items():
        values = config[key] if isinstance(config[key], (tuple, list)) else [config[key]]
        for v in values:
            if v not in valid:
                raise ValueError(f"--{key}={'none' if v is None else format(v, 'g')} is out of range: it must be {valid}")
