"""
nanoGPT's configurator, made strict. Every script keeps its settings as plain
globals and calls, right after defining them:

    configure(globals(), sys.argv[1:])

Arguments without '=' are config files (Python that assigns globals); arguments
of the form --key=value override one global, and a bare --flag sets a boolean
global to True. Unlike nanoGPT:
- an unknown key, in a config file or on the command line, is an error that
  names the key and the closest valid ones;
- a value of the wrong type is an error;
- globals that are None, tuples or lists can be overridden too.
"""
import difflib
import sys
import types
from ast import literal_eval

CONFIG_TYPES = (bool, int, float, str, tuple, list, type(None))


def config_keys(scope):
    """The overridable globals of a script: public names holding plain values."""
    return [k for k, v in scope.items()
            if not k.startswith('_') and isinstance(v, CONFIG_TYPES)]


def _unknown(key, keys, where):
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; valid keys: {', '.join(sorted(keys))}"
    return ValueError(f"unknown config key '{key}' ({where}){hint}")


def _check_type(key, old, new, where):
    """Returns new coerced to old's type, or raises naming the key."""
    if old is None or new is None:
        return new
    if isinstance(old, bool) or isinstance(new, bool):  # bool is an int subclass: check it first
        if isinstance(old, bool) and isinstance(new, bool):
            return new
    elif isinstance(old, float) and isinstance(new, (int, float)):
        return float(new)
    elif isinstance(old, (tuple, list)) and isinstance(new, (tuple, list)):
        return type(old)(new)
    elif type(old) is type(new):
        return new
    raise ValueError(f"config key '{key}' ({where}) expects {type(old).__name__}, "
                     f"got {type(new).__name__} {new!r}")


def _parse_value(old, raw):
    if isinstance(old, str):
        return raw  # strings are taken as written: --out_dir=123 stays '123'
    try:
        return literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw  # a bare word such as --device=cuda for a None default


def configure(scope, argv=None):
    """Applies config files and --key=value overrides in argv to the dict scope."""
    argv = sys.argv[1:] if argv is None else argv
    keys = config_keys(scope)
    for arg in argv:
        if not arg.startswith('--'):
            if '=' in arg or not arg.endswith('.py'):
                raise ValueError(f"expected a config file (*.py) or --key=value, got '{arg}'")
            try:
                with open(arg) as f:
                    source = f.read()
            except OSError as e:
                raise ValueError(f"cannot read config file '{arg}': {e.strerror}") from None
            print(f"Overriding config with {arg}")
            ns = {k: scope[k] for k in keys}
            exec(compile(source, arg, 'exec'), ns)
            for k, v in ns.items():
                if k.startswith('_') or k == '__builtins__' or isinstance(v, types.ModuleType):
                    continue
                if k not in keys:
                    raise _unknown(k, keys, arg)
                if v is not scope[k]:
                    scope[k] = _check_type(k, scope[k], v, arg)
        else:
            if '=' not in arg:
                if isinstance(scope.get(arg[2:]), bool):
                    arg += '=True'  # a bare --flag switches a boolean on
                else:
                    raise ValueError(f"expected --key=value, got '{arg}'")
            key, raw = arg[2:].split('=', 1)
            if key not in keys:
                raise _unknown(key, keys, 'command line')
            scope[key] = _check_type(key, scope[key], _parse_value(scope[key], raw), 'command line')
            print(f"Overriding: {key} = {scope[key]!r}")
    return {k: scope[k] for k in keys}
