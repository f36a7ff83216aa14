"""Each setting of a training run written once: a config dataclass field made by
:func:`knob` carries its default, its command-line help and group, and whether ``--resume``
may change it. The CLI builds its options from the fields (:func:`add_options`), the config
from the parsed arguments (:func:`from_args`), and the resume rules from :func:`resumable`.

    steps: int = knob(3000, "training steps (one batch each)", group="optimisation", resume=True,
                      type=positive_int)
"""

import argparse
import dataclasses

# --------------------------------------------------------------------------------------
# argument types (shared with the commands that have no config)
# --------------------------------------------------------------------------------------


def parse_D(text):
    """--D: a positive number or inf (the EDM / diffusion limit)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"D must be a positive number or 'inf', got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"D must be > 0 (or inf), got {text!r}")
    return value


def _int_at_least(lowest, expected):
    """An argparse type: an integer >= ``lowest``, else an error saying ``expected``."""

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


positive_int = _int_at_least(1, "a positive integer")
nonneg_int = _int_at_least(0, "an integer >= 0")


def int_list(text):
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers, got {text!r}") from None


class Flatten(argparse.Action):
    """``nargs="+"`` of :func:`int_list` values -> one list: the documented ``--mults 1 2 2``
    and the older ``--mults 1,2,2`` give the same."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, [v for part in values for v in part])


INT_LIST = dict(type=int_list, nargs="+", action=Flatten)
SWITCHES = ("auto", "on", "off")

# Options every command that runs networks takes (the training configs' runtime fields and
# `sample` / `evaluate`, which have no config): one text each.
RUNTIME = {
    "device": ("auto", "cpu, cuda, cuda:N or auto (CUDA when available)", {}),
    "precision": ("auto", "auto = bf16 autocast on CUDA, fp32 on CPU", {"choices": ("auto", "fp32", "bf16")}),
    "threads": ("auto", "CPU threads: auto (1 for models under 2M parameters, else torch's default) or a number", {}),
    "backend": ("auto", "backend of the ipfm_fast ops (auto, triton, cuda, cpu or reference: the pure-PyTorch spec)",
                {"choices": ("auto", "triton", "cuda", "cpu", "reference")}),
}


# --------------------------------------------------------------------------------------
# config fields
# --------------------------------------------------------------------------------------


def knob(default, help, *, group=None, resume=False, cli=True, default_factory=None, **argparse_kw):
    """A config dataclass field with its CLI option ``--name-with-dashes``: ``help`` (the
    default is appended by the help formatter), the help ``group``, ``resume`` (True: a
    resumed run may change it, e.g. the budget or the device; False: part of the recipe,
    which comes from the checkpoint), ``cli=False`` for fields the command line does not set,
    and ``argparse_kw`` (type, choices, nargs, action...) for ``add_argument``."""
    meta = dict(help=help, group=group, resume=resume, cli=cli, argparse=argparse_kw)
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def runtime_knob(name):
    """One of :data:`RUNTIME` as a config field (resumable: where a run continues is not its recipe)."""
    default, help, kw = RUNTIME[name]
    return knob(default, help, group="runtime", resume=True, **kw)


def add_runtime_options(parser, names=("device", "precision", "threads")):
    """The :data:`RUNTIME` options for a command without a config."""
    group = parser.add_argument_group("runtime")
    for name in names:
        default, help, kw = RUNTIME[name]
        group.add_argument(f"--{name}", default=default, help=help, **kw)
    return group


def option(name):
    return "--" + name.replace("_", "-")


def add_options(parser, cls):
    """One argparse option per CLI field of the config dataclass ``cls``, in field order,
    under the fields' groups; the defaults are the dataclass's."""
    groups = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta.get("cli"):
            continue
        group = meta["group"]
        if group not in groups:
            groups[group] = parser.add_argument_group(group) if group else parser
        kw = dict(meta["argparse"])
        if kw.get("action") != "store_true":
            kw["default"] = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        groups[group].add_argument(option(f.name), dest=f.name, help=meta["help"], **kw)
    return groups


def from_args(cls, args):
    """The config of ``cls`` from parsed arguments (the CLI fields; the others keep their defaults)."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.metadata.get("cli")})


def resumable(cls):
    """The fields a resumed run may change (the rest is the recipe, from the checkpoint)."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("resume"))
