"""
nanoGPT-style configuration: defaults in the script, then config files, then --key=value overrides.

    python train.py config/pretrain_tiny.py --batch_size=32 --compile=False

A config file is plain Python; every name it assigns must be a known key. Override values are parsed
with ast.literal_eval (a bare word stays a string). Values must have the default's type (an int is
accepted for a float); a default of None accepts anything. Any mistake exits naming the key or file.
"""
import ast
import sys
import types


def _checked(key, value, defaults, where):
    if key not in defaults:
        sys.exit(f"{where}: unknown config key '{key}'")
    default = defaults[key]
    if default is None:
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not type(default):
        sys.exit(f"{where}: '{key}' must be {type(default).__name__} (default {default!r}), "
                 f"got {type(value).__name__} {value!r}")
    return value


def configure(defaults, argv=None):
    """Return a copy of defaults updated from the config files and --key=value arguments in argv."""
    config = dict(defaults)
    for arg in sys.argv[1:] if argv is None else argv:
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            if not eq:
                sys.exit(f"argument '{arg}': expected --key=value")
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text
            config[key] = _checked(key, value, defaults, f"argument '{arg}'")
        else:
            try:
                source = open(arg).read()
            except OSError as e:
                sys.exit(f"config file '{arg}': {e.strerror}")
            scope = {}
            exec(compile(source, arg, "exec"), scope)
            for key, value in scope.items():
                if not key.startswith("_") and not isinstance(value, types.ModuleType):
                    config[key] = _checked(key, value, defaults, f"config file '{arg}'")
    return config
