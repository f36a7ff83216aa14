r"""Flat training state: a network's parameters as views into one contiguous buffer, so
the EMA of a whole network is one pass over two flat buffers, Adam as one fused kernel
call with its moments in flat buffers too, and the gradient norm as one pass.

Why: in the eager CPU distillation step (the e2e MLP: 528k parameters in 34 tensors),
torch.optim.Adam(fused=True) (its Python step machinery, ~0.2 ms a call) and the foreach
EMA (three passes with a temporary) took ~1.7 ms of a ~13 ms iteration. The arithmetic
per element is unchanged (the same fused Adam kernel, the same EMA rounding), so the
parameters come out bitwise the same as before.

Gradients stay where autograd puts them (one tensor per parameter): binding them to
views of a flat buffer makes every backward accumulate in place and every step zero the
buffer, which measured slower in the step than it saved in the optimizer.

Layout: each parameter keeps its shape and strides (channels_last stays channels_last)
and starts on a 64-byte boundary; the padding between parameters is zero.
"""

import torch

from ipfm_fast import _ext
from ipfm_fast.errors import InvalidInput
from ipfm_fast.train import host_memory

ALIGN = 16  # elements between view starts, a multiple of: 64 bytes of float32 (vector loads, compiled kernels)


def _dense_strides(p):
    """p's strides if p covers exactly p.numel() consecutive elements (contiguous or
    channels_last), else None."""
    formats = [torch.contiguous_format]
    formats += {4: [torch.channels_last], 5: [torch.channels_last_3d]}.get(p.dim(), [])
    return p.stride() if any(p.is_contiguous(memory_format=f) for f in formats) else None


class FlatParams:
    """The parameters of ``module`` moved into one flat buffer ``data``: each parameter is
    rebound to a view of it (the same Parameter objects, so modules, optimizers, DDP and
    checkpoints see no difference). Build it after the module has its final device, dtype
    and memory format (``module.to`` afterwards would give the parameters new storage,
    away from the buffer)."""

    def __init__(self, module):
        self.module = module
        self.params = list(module.parameters())
        if not self.params:
            raise InvalidInput(f"{type(module).__name__} has no parameters to train")
        kinds = {(p.dtype, p.device) for p in self.params}
        if len(kinds) > 1:
            raise InvalidInput(f"{type(module).__name__}: training needs parameters of one dtype on one device, got "
                               + ", ".join(sorted(f"{d} on {dev}" for d, dev in kinds)))
        layout, offset = [], 0
        for p in self.params:
            strides = _dense_strides(p)
            if strides is None:
                raise InvalidInput(f"{type(module).__name__}: a parameter of shape {tuple(p.shape)} has strides "
                                   f"{p.stride()} (not dense); make it contiguous before training")
            layout.append((tuple(p.shape), tuple(strides), offset))
            offset += -(-p.numel() // ALIGN) * ALIGN
        self.layout = tuple(layout)
        dtype, device = next(iter(kinds))
        self.data = host_memory.zeros(offset, dtype, device)
        for p, view in zip(self.params, self.views(self.data)):
            view.copy_(p.detach())
            p.data = view

    def views(self, flat):
        """One view of ``flat`` (a buffer of this layout) per parameter, with its shape and strides."""
        base = flat.storage_offset()  # (as_strided's offset counts from the storage's start, not the view's)
        return [flat.as_strided(shape, strides, base + offset) for shape, strides, offset in self.layout]


class FlatAdam:
    """Adam (torch.optim.Adam(fused=True)'s kernel, no weight decay) over the parameters of
    a :class:`FlatParams`: one kernel call per step, no Python per tensor.
    ``step(found_inf)`` skips the update on the device where ``found_inf`` (a 0-dim float
    tensor) is 1, as fused Adam does for a GradScaler. :meth:`state_dict` and
    :meth:`load_state_dict` use torch.optim.Adam's format (one state entry per parameter),
    so checkpoints written by torch.optim.Adam load here and the other way round."""

    def __init__(self, flat, lr, betas=(0.9, 0.999), eps=1e-8):
        self.flat = flat
        self.lr, self.betas, self.eps = float(lr), (float(betas[0]), float(betas[1])), float(eps)
        self.exp_avg = host_memory.zeros(flat.data.numel(), flat.data.dtype, flat.data.device)
        self.exp_avg_sq = host_memory.zeros(flat.data.numel(), flat.data.dtype, flat.data.device)
        self._moments = (flat.views(self.exp_avg), flat.views(self.exp_avg_sq))
        # Adam's t, on the device; one for all parameters (the kernel reads it per tensor), as
        # these networks train every parameter every step
        self.steps = torch.zeros((), dtype=torch.float32, device=flat.data.device)
        self.started = False  # torch.optim.Adam has no state before its first step
        # the extension's beta1 = 0 kernel: the tensors' places in the flat buffers, and whether a
        # moment may need its old value (set after a state is loaded: the next step reads them all)
        self._offsets = [offset for _, _, offset in flat.layout]
        self._numels = [p.numel() for p in flat.params]
        self._contiguous = [p.is_contiguous() for p in flat.params]
        self._read_m = torch.ones((), dtype=torch.bool)

    def step(self, found_inf=None, ema=None):
        """One update of the parameters that have a gradient (the others are left alone, as
        torch.optim.Adam leaves them). ``ema``: optionally (buffer, weight), a flat buffer of
        this layout (an EMA's) moved towards the updated parameters, ``buffer += (p -
        buffer) * weight`` with weight 0 where ``found_inf`` skips the update (a number or
        a 0-dim tensor), as :func:`ema_step_` would after the step."""
        if ema is not None and self._fused(found_inf):
            self._step_cpu(found_inf, ema)
            return
        live = [(p, m, v) for p, m, v in zip(self.flat.params, *self._moments) if p.grad is not None]
        if live:
            if ema is None and self._fused(found_inf, live):
                self._step_cpu(found_inf, None)
                return
            params, m, v = (list(t) for t in zip(*live))
            grads = [p.grad for p in params]
            self.started = True
            self.steps.add_(1)
            torch._fused_adam_(params, grads, m, v, [], [self.steps] * len(params), lr=self.lr, beta1=self.betas[0],
                               beta2=self.betas[1], weight_decay=0.0, eps=self.eps, amsgrad=False, maximize=False,
                               grad_scale=None, found_inf=found_inf)
            if found_inf is not None:
                self.steps.sub_(found_inf)  # a skipped update does not count, as in torch.optim.Adam
        if ema is not None:
            ema_step_(ema[0], self.flat.data, ema[1], None if found_inf is None else found_inf > 0)

    def _fused(self, found_inf, live=None):
        """Whether this step can run as the extension's beta1 = 0 kernel: float32 on CPU,
        every parameter with a gradient (``live`` given: those that have one) laid out as
        its parameter, and the kernel found equal to torch's on this machine."""
        data = self.flat.data
        if not (self.betas[0] == 0.0 and data.is_cpu and data.dtype is torch.float32 and _ext._C is not None
                and (found_inf is None or (found_inf.is_cpu and found_inf.dtype is torch.float32))):
            return False
        params = self.flat.params
        if live is not None and len(live) != len(params):
            return False
        for p, contiguous in zip(params, self._contiguous):
            g = p.grad
            if g is None or not (g.is_contiguous() if contiguous else g.stride() == p.stride()):
                return False
        return own_adam_matches_torch()

    def _step_cpu(self, found_inf, ema):
        buffer, weight = ema if ema is not None else (None, 0.0)
        tensor_weight = isinstance(weight, torch.Tensor)
        if tensor_weight:
            weight = weight.to(torch.float32)
        self.started = True
        _ext._C.adam_beta1_zero_cpu(
            [p.grad.data_ptr() for p in self.flat.params], self._offsets, self._numels,
            self.flat.data.data_ptr(), self.exp_avg.data_ptr(), self.exp_avg_sq.data_ptr(),
            buffer.data_ptr() if buffer is not None else 0, weight.data_ptr() if tensor_weight else 0,
            0.0 if tensor_weight else float(weight), found_inf.data_ptr() if found_inf is not None else 0,
            self.steps.data_ptr(), self._read_m.data_ptr(), self.lr, self.betas[1], self.eps, torch.get_num_threads())

    def zero_grad(self):
        for p in self.flat.params:
            p.grad = None

    def state_dict(self):
        n = len(self.flat.params)
        state = {}
        if self.started:
            state = {i: {"step": self.steps.clone(), "exp_avg": m, "exp_avg_sq": v}
                     for i, (m, v) in enumerate(zip(*self._moments))}
        group = dict(lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=0, amsgrad=False, maximize=False,
                     foreach=None, capturable=False, differentiable=False, fused=True, decoupled_weight_decay=False,
                     params=list(range(n)))
        return {"state": state, "param_groups": [group]}

    def load_state_dict(self, state_dict):
        """Restore torch.optim.Adam-format state; state that does not fit this network is a
        ValueError naming the first mismatch (the checkpoint loader turns it into a BadFile)."""
        groups = state_dict["param_groups"]
        n = len(self.flat.params)
        if len(groups) != 1 or len(groups[0]["params"]) != n:
            raise ValueError(f"the optimizer state has {sum(len(g['params']) for g in groups)} parameters in "
                             f"{len(groups)} group(s); this network has {n} in one")
        group, state = groups[0], state_dict["state"]
        if group.get("weight_decay", 0) or group.get("amsgrad") or group.get("maximize"):
            raise ValueError("the optimizer state uses weight decay, amsgrad or maximize, which this Adam does not")
        self.exp_avg.zero_()
        self.exp_avg_sq.zero_()
        self.steps.zero_()
        self.started = bool(state)
        if state:
            ids = group["params"]
            if any(i not in state for i in ids):
                raise ValueError("the optimizer state lacks some parameters' moments")
            for i, p, m, v in zip(ids, self.flat.params, *self._moments):
                for key, dst in (("exp_avg", m), ("exp_avg_sq", v)):
                    if tuple(state[i][key].shape) != tuple(p.shape):
                        raise ValueError(f"parameter {i}'s {key} has shape {tuple(state[i][key].shape)}, this "
                                         f"network's {tuple(p.shape)}")
                    dst.copy_(state[i][key])
            self.steps.copy_(torch.as_tensor(state[ids[0]]["step"], dtype=torch.float32))
        self.lr, self.eps = float(group["lr"]), float(group["eps"])
        self.betas = (float(group["betas"][0]), float(group["betas"][1]))
        self._read_m.fill_(True)  # the loaded moments may hold values the next step must read


_OWN_ADAM = {}  # instruction-set path -> whether the extension's kernel equals torch's here


def own_adam_matches_torch():
    """Whether the extension's beta1 = 0 Adam (csrc/cpu/optim.cpp) gives bitwise torch's CPU
    fused Adam on this machine and torch build: checked once per instruction-set path on
    probe tensors (vector bodies and scalar tails, zero and tiny values, several steps, the
    fused EMA against :func:`ema_step_`). When it does not, FlatAdam keeps torch's kernel."""
    isa = _ext._C.cpu_isa()
    if isa not in _OWN_ADAM:
        _OWN_ADAM[isa] = _probe_own_adam()
    return _OWN_ADAM[isa]


def _probe_own_adam():
    rng = torch.Generator().manual_seed(1234)
    shapes = [(1,), (7,), (8,), (9,), (3, 11), (40,), (1000,), (2, 16391)]
    for lr, beta2, scale in ((1e-4, 0.999, 1e-2), (3e-3, 0.99, 1e3), (1e-5, 0.9999, 1e-6)):
        net = torch.nn.Module()
        for k, shape in enumerate(shapes):
            net.register_parameter(f"p{k}", torch.nn.Parameter(torch.randn(shape, generator=rng) * 1e-3))
        ours = FlatAdam(FlatParams(net), lr=lr, betas=(0.0, beta2))
        params = [p.detach().clone() for p in ours.flat.params]
        m = [torch.zeros_like(p) for p in params]
        v = [torch.zeros_like(p) for p in params]
        steps = torch.zeros(())
        ema_ours = torch.zeros_like(ours.flat.data)  # an EMA buffer: zero padding between the views, as in use
        for view in ours.flat.views(ema_ours):
            view.copy_(torch.randn(view.shape, generator=rng) * 1e-3)
        ema_ref = ema_ours.clone()
        ref_flat = ours.flat.data.clone()
        for step in range(4):
            grads = [torch.randn(p.shape, generator=rng) * scale for p in params]
            for grad in grads:  # zeros of both signs: the old moment's sign decides the new one's
                grad.view(-1)[::5] = 0.0
                grad.view(-1)[1::7] = -0.0
            for p, grad in zip(ours.flat.params, grads):
                p.grad = grad.clone()
            found = torch.tensor(float(step == 2))
            ours._step_cpu(found, (ema_ours, 0.25))  # (not step(): that asks this probe)
            steps.add_(1)
            torch._fused_adam_(params, grads, m, v, [], [steps] * len(params), lr=lr, beta1=0.0, beta2=beta2,
                               weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False, grad_scale=None,
                               found_inf=found)
            steps.sub_(found)
            for view, p in zip(ours.flat.views(ref_flat), params):
                view.copy_(p)
            ema_step_(ema_ref, ref_flat, 0.25, found > 0)
            for a, b in [(ours.flat.params, params), (ours._moments[0], m), (ours._moments[1], v)]:
                if not all(torch.equal(x.detach().view(torch.int32), y.view(torch.int32)) for x, y in zip(a, b)):
                    return False
            if not (torch.equal(ema_ours.view(torch.int32), ema_ref.view(torch.int32)) and torch.equal(ours.steps, steps)):
                return False
    return True


def ema_step_(ema, src, weight, skip=None):
    """``ema += (src - ema) * w`` for flat buffers ``ema`` and ``src``, with ``w = weight`` (a
    0-dim tensor, no host read, or a number) times ``~skip`` when ``skip`` (a 0-dim bool
    tensor) is given. On CPU float32 one pass of the extension's kernel (bitwise the torch
    ops below: each operation rounded to float32); elsewhere the torch ops (on CUDA a
    temporary costs nothing, the caching allocator holds it)."""
    if ema.device.type == "cpu" and ema.dtype == torch.float32 and _ext._C is not None:
        tensor_weight = isinstance(weight, torch.Tensor)
        if tensor_weight:
            weight = weight.to(torch.float32)
        skip = skip.to(torch.bool) if skip is not None else None  # (kept alive across the call)
        _ext._C.ema_step_cpu(ema.data_ptr(), src.data_ptr(), ema.numel(), weight.data_ptr() if tensor_weight else 0,
                             0.0 if tensor_weight else float(weight), skip.data_ptr() if skip is not None else 0,
                             torch.get_num_threads())
    else:
        if skip is not None:
            weight = (~skip).to(ema.dtype) * weight
        ema.add_(torch.sub(src, ema).mul_(weight))


def _cpu_kernel_grads(params):
    """The float32 CPU gradients of ``params`` (those that have one) if the extension's kernel
    can read them all (dense), else None. (is_cpu and is_contiguous first: the general
    checks cost ~40 us a call on 34 tensors.)"""
    grads = [p.grad for p in params if p.grad is not None]
    if grads and _ext._C is not None and all(g.is_cpu and g.dtype is torch.float32
                                             and (g.is_contiguous() or _dense_strides(g) is not None) for g in grads):
        return grads
    return None


def grad_norm(params):
    """The 2-norm of the parameters' gradients (those that have one) as a 0-dim float32
    tensor on their device, never read back to the host. On CPU, float32 gradients are one
    parallel pass of the extension's kernel (squares summed in double: as accurate as the
    float64 norm to float32 rounding, and the same for any thread count); elsewhere torch's
    foreach norm (one fused kernel on CUDA)."""
    grads = _cpu_kernel_grads(params)
    if grads is not None:
        out = torch.empty((), dtype=torch.float32)
        _ext._C.grad_norm_cpu([g.data_ptr() for g in grads], [g.numel() for g in grads], out.data_ptr(),
                              torch.get_num_threads())
        return out
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=params[0].device if params else "cpu")
    return torch.nn.utils.get_total_norm(grads, foreach=True)


def norm_and_skip(params, loss, masked=None, rows=None):
    """The gradient norm and whether to skip the update, decided on the device:
    ``bad = ~(isfinite(loss) & isfinite(norm))``, or'ed with ``masked >= rows`` when a
    masked-row count is given. Returns (norm, bad: 0-dim bool, found_inf: bad as a 0-dim
    float, the fused Adam's skip flag). On CPU with float32 gradients and loss, one call of
    the norm kernel makes the decision too (the five small torch ops cost more than the
    pass over the gradients in a training step); elsewhere the torch ops, same values."""
    grads = _cpu_kernel_grads(params)
    if (grads is not None and loss.is_cpu and loss.dtype is torch.float32 and loss.dim() == 0
            and (masked is None or (masked.is_cpu and masked.dtype is torch.int64 and masked.dim() == 0))):
        norm, found_inf = torch.empty((), dtype=torch.float32), torch.empty((), dtype=torch.float32)
        bad = torch.empty((), dtype=torch.bool)
        _ext._C.grad_norm_cpu([g.data_ptr() for g in grads], [g.numel() for g in grads], norm.data_ptr(),
                              torch.get_num_threads(), loss=loss.data_ptr(),
                              masked=masked.data_ptr() if masked is not None else 0,
                              rows=int(rows) if masked is not None else -1, bad=bad.data_ptr(),
                              found_inf=found_inf.data_ptr())
        return norm, bad, found_inf
    norm = grad_norm(params)
    bad = ~(torch.isfinite(loss) & torch.isfinite(norm))
    if masked is not None:
        bad = bad | (masked >= rows)
    return norm, bad, bad.float()
