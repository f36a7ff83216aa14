"""One chain of input rules (ipfm_fast/_checks.py) for the fused ops and the reference: for
every bad input, the public op on each fused backend and ipfm_fast.reference raise the same
error type with the same message (where the C++ CPU kernel checks a value itself, it
formats the number its own way: the message up to the value is compared)."""

import math
import re

import pytest
import torch

import ipfm_fast as ipf
from ipfm_fast import reference as ref
from ipfm_fast.errors import InvalidInput, InvalidType

from conftest import fused_backends


def _cases():
    """(op name, kwargs of the call, values checked by the C++ CPU kernel)."""
    x = torch.randn(4, 3)
    y, x_ref = torch.randn(3, 6), torch.randn(5, 6)
    a = torch.randn(3, 4)
    b, gx = a + 0.1, a - 0.2
    nan_y, nan_ref = y.clone(), x_ref.clone()
    nan_y[1, 2], nan_ref[4, 0] = float("nan"), float("inf")
    bad_sigma = torch.tensor([1.0, -1.0, 1.0, 1.0])
    return [
        ("perturb", dict(x=x, sigma=0.5, D=0.0), False),
        ("perturb", dict(x=x, sigma=0.5, D=torch.tensor(2.0)), False),
        ("perturb", dict(x=x, sigma=float("inf"), D=8.0), False),
        ("perturb", dict(x=x, sigma=bad_sigma, D=8.0), False),
        ("perturb", dict(x=x, sigma=torch.ones(3), D=8.0), False),
        ("perturb", dict(x=x, sigma=torch.ones(4, device="meta"), D=8.0), False),
        ("perturb", dict(x=x, sigma=torch.ones(4, dtype=torch.int64), D=8.0), False),
        ("perturb", dict(x=x, sigma="1", D=8.0), False),
        ("perturb", dict(x=x.int(), sigma=0.5, D=8.0), False),
        ("perturb", dict(x=torch.tensor(1.0), sigma=0.5, D=8.0), False),
        ("perturb", dict(x=[1.0], sigma=0.5, D=8.0), False),
        ("perturb", dict(x=x, sigma=0.5, D=8.0, generator="seed"), False),
        ("sample_prior", dict(shape=(), sigma=1.0, D=4.0), False),
        ("sample_prior", dict(shape="ab", sigma=1.0, D=4.0), False),
        ("sample_prior", dict(shape=(2, -1), sigma=1.0, D=4.0), False),
        ("sample_prior", dict(shape=(2, 3), sigma=1.0, D=4.0, dtype=torch.int64), False),
        ("sample_prior", dict(shape=(4, 3), sigma=bad_sigma, D=4.0), False),
        ("sample_prior", dict(shape=(2, 3), sigma=1.0, D=-1.0), False),
        ("field_target", dict(y=y, sigma=1.0, x_ref=x_ref[:, :5], D=8.0), False),
        ("field_target", dict(y=y, sigma=1.0, x_ref=x_ref[:0], D=8.0), False),
        ("field_target", dict(y=y, sigma=1.0, x_ref=x_ref.to("meta"), D=8.0), False),
        ("field_target", dict(y=y[:, :0], sigma=1.0, x_ref=x_ref[:, :0], D=8.0), False),
        ("field_target", dict(y=y, sigma=1.0, x_ref=x_ref, D=0.0), False),
        ("field_target", dict(y=y, sigma=torch.tensor([1.0, float("nan"), 1.0]), x_ref=x_ref, D=8.0), False),
        ("field_target", dict(y=nan_y, sigma=1.0, x_ref=x_ref, D=8.0), True),
        ("field_target", dict(y=y, sigma=1.0, x_ref=nan_ref, D=math.inf), True),
        ("field_target", dict(y=y.numpy(), sigma=1.0, x_ref=x_ref, D=8.0), False),
        ("ipfm_generator_loss", dict(teacher_out=a, fake_out=b, x=gx[:, :3]), False),
        ("ipfm_generator_loss", dict(teacher_out=a, fake_out=b.half(), x=gx), False),
        ("ipfm_generator_loss", dict(teacher_out=a, fake_out=b.to("meta"), x=gx), False),
        ("ipfm_generator_loss", dict(teacher_out=a, fake_out=b, x=[1.0]), False),
        ("ipfm_generator_loss", dict(teacher_out=a, fake_out=b, x=gx, weight=torch.ones(4)), False),
        ("ipfm_generator_loss", dict(teacher_out=a, fake_out=b, x=gx, weight="uniform"), False),
        ("ipfm_generator_loss", dict(teacher_out=a, fake_out=b, x=gx, alpha=math.inf), False),
        ("ipfm_generator_loss", dict(teacher_out=a, fake_out=b, x=gx, alpha=torch.tensor(1.0)), False),
        ("ipfm_generator_loss", dict(teacher_out=a, fake_out=b, x=gx, reduction="avg"), False),
        ("ipfm_fake_loss", dict(fake_out=b, x=gx, sigma=0.0), False),
        ("ipfm_fake_loss", dict(fake_out=b, x=gx, sigma=torch.tensor([1.0, 2.0, -1.0])), True),
        ("ipfm_fake_loss", dict(fake_out=b, x=gx, sigma=torch.ones(2)), False),
        ("ipfm_fake_loss", dict(fake_out=b, x=gx, sigma=1.0, sigma_data=0.0), False),
        ("ipfm_fake_loss", dict(fake_out=b, x=gx[:, :2], sigma=1.0), False),
        ("ipfm_fake_loss", dict(fake_out=b, x=gx, sigma=1.0, reduction=None), False),
    ]


def _raised(fn, kwargs):
    with pytest.raises((InvalidInput, InvalidType)) as caught:
        fn(**kwargs)
    return caught.value


def _up_to_value(message):
    return re.split(r" got | \(row ", message)[0]


@pytest.mark.parametrize("backend", fused_backends("cpu"))
def test_fused_and_reference_refuse_the_same_inputs(backend):
    for op, kwargs, kernel_checks in _cases():
        fused = _raised(getattr(ipf, op), {**kwargs, "backend": backend})
        spec = _raised(getattr(ref, op), kwargs)
        assert type(fused) is type(spec), (op, kwargs, fused, spec)
        if kernel_checks and backend == "cpu":
            assert _up_to_value(str(fused)) == _up_to_value(str(spec)), (op, fused, spec)
        else:
            assert str(fused) == str(spec), (op, kwargs)
        assert str(spec).startswith(f"{op}: ")
