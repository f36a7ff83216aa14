"""The shape every op shares (quack's ``rmsnorm.py``), written once here so that each op file
holds only its math and launch code:

    leaf        @leaf("ipfm_fast::name") on a launcher body (tensors in, new tensors out),
                + @<leaf>.register_fake: a torch.library custom op with a fake
                implementation and no autograd of its own. Calling the Leaf runs the body
                directly when the call is eager -- no dispatcher round trip, ~10 us less
                per call on a CPU -- and the custom op when it is traced, so that a traced
                graph holds one opaque op whose fake implementation gives the shapes.
    Function    one torch.autograd.Function per op: a subclass of :class:`Function` names
                its forward ``leaf`` and defines ``save(ctx, inputs, outputs)`` (what the
                backward needs) and ``backward(ctx, *grads)``, which calls leaves of its
                own where it launches kernels. The public function calls ``Function.run``.

Under torch.compile Dynamo traces the Function (forward and backward) and meets the custom
ops inside; AOTAutograd, make_fx and compiled autograd trace the same Python with fake or
functional tensors, where the raw-pointer launchers cannot run: :func:`traced` recognizes
all of them, whatever ``torch.compiler.is_compiling()`` says (a backward traced by
AOTAutograd under torch 2.11 has it False).
"""

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor

LEAVES = []  # every Leaf, in definition order (tests check each one's registration)
FUNCTIONS = []  # every Function subclass (their autograd nodes are "<name>Backward")


_compiling = torch.compiler.is_compiling
_modes = torch._C._len_torch_dispatch_stack
_functional = torch._is_functional_tensor  # C++ functionalization (torch.func.functionalize)
_TRACING_TENSORS = (FakeTensor, FunctionalTensor)


def traced(args):
    """True when a call with ``args`` is being traced rather than run: under Dynamo, under
    any torch dispatch mode (FakeTensorMode, make_fx's proxy mode, AOTAutograd's
    functionalization; also a user's mode, e.g. a FLOP counter, which should see the op),
    or with a fake or functional tensor as the first tensor argument (the tensors of one
    call come from one trace, or none). 0.2-0.4 us when eager. Dynamo must meet
    is_compiling() first: it folds that to True and never sees the rest."""
    if _compiling() or _modes():
        return True
    for a in args:
        if isinstance(a, torch.Tensor):
            return type(a) is not torch.Tensor and isinstance(a, _TRACING_TENSORS) or _functional(a)
    return False


class Leaf:
    """A launcher registered as the custom op ``name``; see the module docstring. ``op`` is
    the torch.library CustomOpDef (for opcheck and torch.ops.ipfm_fast.<name>), ``impl``
    the Python body."""

    def __init__(self, name, fn):
        self.impl = fn
        self.op = torch.library.custom_op(name, mutates_args=())(fn)
        self.__name__, self.__doc__ = fn.__name__, fn.__doc__
        LEAVES.append(self)

    def register_fake(self, fn):
        self.op.register_fake(fn)
        return fn

    def __call__(self, *args):
        return self.op(*args) if traced(args) else self.impl(*args)


def leaf(name):
    """Decorator: the launcher body ``fn`` (annotated: torch.library infers the schema from
    its signature) as the :class:`Leaf` ``name``."""
    return lambda fn: Leaf(name, fn)


class Function(torch.autograd.Function):
    """Base of each op's one autograd.Function. A subclass sets ``leaf`` (its forward) and
    defines ``save(ctx, inputs, outputs)`` and ``backward(ctx, *grads)``; the forward,
    ``outputs = leaf(*inputs); save(ctx, inputs, outputs)``, is written here once, so the
    paths with and without autograd return the same outputs.

    ``save`` is not named ``setup_context``: with that, torch binds every call's arguments
    through inspect.signature (~10 us per call)."""

    leaf = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not isinstance(cls.leaf, Leaf):
            raise TypeError(f"{cls.__name__}.leaf must be a Leaf (@ipfm_fast.ops._op.leaf), got {cls.leaf!r}")
        leaf, save = cls.leaf, cls.save

        def forward(ctx, *inputs):
            outputs = leaf(*inputs)
            save(ctx, inputs, outputs)
            return outputs

        cls.forward = staticmethod(forward)
        FUNCTIONS.append(cls)

    @staticmethod
    def save(ctx, inputs, outputs):
        pass

    @classmethod
    def run(cls, *inputs):
        """The op on ``inputs``: through autograd when a gradient can flow to one of them,
        else the leaf alone (no autograd node, no saved tensors). Under Dynamo always the
        Function: Dynamo decides from what it knows of requires_grad."""
        if _compiling() or (torch.is_grad_enabled() and torch._C._any_requires_grad(*inputs)):
            return cls.apply(*inputs)
        return cls.leaf(*inputs)
