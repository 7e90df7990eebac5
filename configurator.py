"""
nanoGPT-style configuration: defaults in the script, then config files, then --key=value overrides.

    python train.py config/pretrain_tiny.py --batch_size=32 --compile=False
    python train.py --help                       # every key, its default and what it does

A config file is Python, and it is executed, as nanoGPT's are: run only config files you trust. Every
name it assigns must be a known key. Override values are parsed with ast.literal_eval (a bare word
stays a string). Values must have the default's type (an int is accepted for a float); a default of
None accepts anything. Any mistake exits naming the key or file; an unknown key suggests the closest
known one. `require` then checks ranges, again naming the key.
"""
import ast
import difflib
import math
import os
import re
import sys
import types


def _checked(key, value, defaults, where):
    if key not in defaults:
        close = difflib.get_close_matches(key, defaults, n=1)
        sys.exit(f"{where}: unknown config key '{key}'" + (f" (did you mean '{close[0]}'?)" if close else "")
                 + "; --help lists the keys")
    default = defaults[key]
    if default is None:
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, list) and isinstance(value, str):
        return [value]  # --plot=out/run means a list of one
    if type(value) is not type(default):
        sys.exit(f"{where}: '{key}' must be {type(default).__name__} (default {default!r}), "
                 f"got {type(value).__name__} {value!r}")
    return value


def _comments(paths):
    """{key: the comment beside its default} from `key=value,  # comment` or `key: type = value  # comment`
    lines of the given source files."""
    out = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                m = re.match(r"\s*(\w+)\s*(?::[^=]+)?=[^#]*#\s*(.*)", line)
                if m and m.group(1) not in out:
                    out[m.group(1)] = m.group(2).strip()
    return out


def print_help(defaults, doc_files):
    main = sys.modules["__main__"]
    print(f"usage: python {os.path.basename(sys.argv[0])} [CONFIG_FILE ...] [--key=value ...]")
    print((main.__doc__ or "").rstrip())
    files = [p for p in (getattr(main, "__file__", None), *doc_files) if p and os.path.isfile(p)]
    notes = _comments(files)
    print("\nkeys (default, and what it does):")
    width = max(len(f"{k}={v!r}") for k, v in defaults.items())
    for key, value in defaults.items():
        print(f"  {f'{key}={value!r}':<{width}}  {notes.get(key, '')}".rstrip())


def configure(defaults, argv=None, doc_files=()):
    """Return a copy of defaults updated from the config files and --key=value arguments in argv.
    --help (or -h) prints the keys with the comments beside them in the main script and doc_files."""
    config = dict(defaults)
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print_help(defaults, doc_files)
        sys.exit(0)
    for arg in argv:
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            if not eq:
                sys.exit(f"argument '{arg}': expected --key=value")
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError, RecursionError):
                value = text
            config[key] = _checked(key, value, defaults, f"argument '{arg}'")
        else:
            try:
                source = open(arg).read()
            except (OSError, UnicodeDecodeError) as e:
                sys.exit(f"config file '{arg}': {getattr(e, 'strerror', None) or e}")
            scope = {}
            try:
                exec(compile(source, arg, "exec"), scope)
            except Exception as e:  # noqa: BLE001 - any error in the user's file, reported with its line
                line = getattr(e, "lineno", None) or next((t.tb_lineno for t in _frames(e.__traceback__)
                                                           if t.tb_frame.f_code.co_filename == arg), "?")
                sys.exit(f"config file '{arg}', line {line}: {type(e).__name__}: {e}")
            for key, value in scope.items():
                if not key.startswith("_") and not isinstance(value, types.ModuleType):
                    config[key] = _checked(key, value, defaults, f"config file '{arg}'")
    return config


def _frames(tb):
    while tb is not None:
        yield tb
        tb = tb.tb_next


def require(cfg, rules):
    """Exit naming the first key whose value breaks its rule: rules maps key -> (ok(value), 'what it
    must be'). NaN breaks every numeric rule, since comparisons with it are false."""
    for key, (ok, what) in rules.items():
        if not ok(cfg[key]):
            sys.exit(f"{key}={cfg[key]!r} must be {what}")


# the usual rules
AT_LEAST_1 = (lambda v: v >= 1, ">= 1")
NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
POSITIVE = (lambda v: v > 0 and math.isfinite(v), "a finite number > 0")
NOT_EMPTY = (lambda v: bool(str(v).strip().strip("/")), "a non-empty path")


def one_of(*choices):
    return (lambda v: v in choices, f"one of {', '.join(map(repr, choices))}")


class _Lines:
    """tqdm's output when stderr is not a terminal (a log file, CI): each refresh is one plain line
    instead of a carriage return, so a log does not become one long line."""

    def write(self, text):
        text = text.strip("\r\n")
        if text:
            sys.stderr.write(text + "\n")

    def flush(self):
        sys.stderr.flush()


def progress(iterable=None, **kw):
    """A tqdm bar on a terminal; elsewhere a plain line every 30 seconds (and the last one)."""
    from tqdm import tqdm
    if not sys.stderr.isatty():
        kw = {"file": _Lines(), "mininterval": 30, "ascii": True, **kw}
    return tqdm(iterable, **kw)
