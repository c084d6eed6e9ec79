"""The operators as PyTorch sees them: the public contract's names, opcheck (schema, fake
kernels, autograd wiring) and torch.compile(fullgraph=True) of all three against eager."""

import inspect

import pytest
import torch

from conftest import as_input, assert_close_to_reference, randn, uniform
from softmix import ops

# --------------------------------------------------------------------------------------
# the public contract (DESIGN.md 7): names, argument names and defaults
# --------------------------------------------------------------------------------------

CONTRACT = {
    "latent_transform": [("r", None), ("v", None), ("s", None)],
    "mc_loss": [("pred", None), ("target", None), ("weight", None), ("bound", "jensen"), ("temperature", 1.0)],
    "denoise_step": [
        ("x_t", None),
        ("model_output", None),
        ("alpha_bar_t", None),
        ("alpha_bar_prev", None),
        ("noise", None),
        ("eta", 1.0),
        ("prediction_type", "epsilon"),
        ("clip_sample", None),
    ],
}


@pytest.mark.parametrize("name", CONTRACT)
def test_python_wrapper_keeps_the_contract_signature(name):
    params = list(inspect.signature(getattr(ops, name)).parameters.values())
    positional = [p for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    got = [(p.name, None if p.default is p.empty else p.default) for p in positional]
    assert got == CONTRACT[name]


# Arguments the raw ops take after the contract's, each optional: calls written against the
# contract mean the same. mc_loss's log_weights weight a finite mixture (test_mc_loss.py; the
# wrapper takes them by keyword); denoise_step's seed draws the noise in the kernel
# (test_normal_noise.py).
SCHEMA_EXTENSIONS = {"latent_transform": [], "mc_loss": [("log_weights", None)], "denoise_step": [("seed", None)]}


@pytest.mark.parametrize("name", CONTRACT)
def test_torch_ops_schema_keeps_the_contract_names_and_defaults(name):
    schema = getattr(torch.ops.softmix, name).default._schema
    got = [(a.name, a.default_value if a.has_default_value() else None) for a in schema.arguments]
    assert got == CONTRACT[name] + SCHEMA_EXTENSIONS[name]
    assert all(a.has_default_value() for a in schema.arguments[len(CONTRACT[name]):])


def test_wrappers_and_torch_ops_compute_the_same(rng):
    r, v, s = randn(rng, 5, 4), randn(rng, 2, 5, 4), uniform(rng, 2, low=0.5, high=1.5)
    assert torch.equal(ops.latent_transform(r, v, s), torch.ops.softmix.latent_transform(r, v, s))
    pred, target, weight = randn(rng, 3, 4, 6), randn(rng, 4, 6), uniform(rng, 4)
    assert torch.equal(ops.mc_loss(pred, target, weight), torch.ops.softmix.mc_loss(pred, target, weight))
    assert torch.equal(
        ops.mc_loss(pred, target, weight, "logmeanexp", 0.3),
        torch.ops.softmix.mc_loss(pred, target, weight, "logmeanexp", 0.3),
    )
    log_weights = torch.log_softmax(randn(rng, 3, 4), 0)
    assert torch.equal(
        ops.mc_loss(pred, target, weight, "logmeanexp", 0.3, log_weights=log_weights),
        torch.ops.softmix.mc_loss(pred, target, weight, "logmeanexp", 0.3, log_weights),
    )
    x, m, noise = randn(rng, 4, 6), randn(rng, 4, 6), randn(rng, 4, 6)
    a_t = uniform(rng, 4, low=0.2, high=0.6)
    for got, expected in zip(
        ops.denoise_step(x, m, a_t, a_t + 0.1, noise, 0.5, "v_prediction", 1.0),
        torch.ops.softmix.denoise_step(x, m, a_t, a_t + 0.1, noise, 0.5, "v_prediction", 1.0),
    ):
        assert torch.equal(got, expected)


# --------------------------------------------------------------------------------------
# opcheck: schema, fake kernels, autograd registration, AOT dispatch
# --------------------------------------------------------------------------------------


def lt_args(rng, dtype, grad, n=6, d=5, layers=2, per_position=False):
    s_shape = (layers, n) if per_position else (layers,)
    return (
        as_input(randn(rng, n, d), dtype, "cpu", grad),
        as_input(randn(rng, layers, n, d) * 0.4, dtype, "cpu", grad),
        as_input(uniform(rng, *s_shape, low=0.5, high=1.5), dtype, "cpu", grad),
    )


def mc_args(rng, dtype, grad, m=3, b=4, bound="jensen", temperature=1.0, log_weights=False):
    loss_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype  # weights' too
    return (
        as_input(randn(rng, m, b, 2, 3), dtype, "cpu", grad),
        as_input(randn(rng, b, 2, 3), dtype, "cpu", grad),
        as_input(uniform(rng, b, low=0.1, high=2.0), loss_dtype, "cpu", grad),
        bound,
        temperature,
        as_input(torch.log_softmax(randn(rng, m, b), 0), loss_dtype, "cpu", grad) if log_weights else None,
    )


def step_args(rng, dtype, grad, b=4, eta=1.0, prediction_type="epsilon", clip=None, with_noise=True, seed=None):
    a_t = uniform(rng, b, low=0.2, high=0.7)
    alphas = torch.float64 if dtype == torch.float64 else torch.float32
    return (
        as_input(randn(rng, b, 3, 4), dtype, "cpu", grad),
        as_input(randn(rng, b, 3, 4), dtype, "cpu", grad),
        a_t.to(alphas),
        (a_t + 0.1).to(alphas),
        as_input(randn(rng, b, 3, 4), dtype, "cpu", grad) if with_noise else None,
        eta,
        prediction_type,
        clip,
        seed,
    )


OPCHECK_CASES = {
    "latent_transform-s_per_layer": ("latent_transform", lambda rng, dt, g: lt_args(rng, dt, g)),
    "latent_transform-s_per_position": ("latent_transform", lambda rng, dt, g: lt_args(rng, dt, g, per_position=True)),
    "latent_transform-L4-D1": ("latent_transform", lambda rng, dt, g: lt_args(rng, dt, g, n=3, d=1, layers=4)),
    "latent_transform-N0": ("latent_transform", lambda rng, dt, g: lt_args(rng, dt, g, n=0)),
    "mc_loss-jensen": ("mc_loss", lambda rng, dt, g: mc_args(rng, dt, g)),
    "mc_loss-logmeanexp": ("mc_loss", lambda rng, dt, g: mc_args(rng, dt, g, bound="logmeanexp", temperature=0.5)),
    "mc_loss-M1-B0": ("mc_loss", lambda rng, dt, g: mc_args(rng, dt, g, m=1, b=0, bound="logmeanexp")),
    "mc_loss-jensen-log_weights": ("mc_loss", lambda rng, dt, g: mc_args(rng, dt, g, log_weights=True)),
    "mc_loss-logmeanexp-log_weights": (
        "mc_loss",
        lambda rng, dt, g: mc_args(rng, dt, g, bound="logmeanexp", temperature=0.5, log_weights=True),
    ),
    "mc_loss-M2-B0-log_weights": (
        "mc_loss",
        lambda rng, dt, g: mc_args(rng, dt, g, m=2, b=0, bound="logmeanexp", log_weights=True),
    ),
    "mc_loss_with_errors-jensen": ("mc_loss_with_errors", lambda rng, dt, g: mc_args(rng, dt, g)),
    "mc_loss_with_errors-logmeanexp": (
        "mc_loss_with_errors",
        lambda rng, dt, g: mc_args(rng, dt, g, m=5, bound="logmeanexp", temperature=2.0),
    ),
    "mc_loss_with_errors-logmeanexp-log_weights": (
        "mc_loss_with_errors",
        lambda rng, dt, g: mc_args(rng, dt, g, m=5, bound="logmeanexp", temperature=2.0, log_weights=True),
    ),
    "denoise_step-epsilon": ("denoise_step", lambda rng, dt, g: step_args(rng, dt, g)),
    "denoise_step-v_prediction-clip": (
        "denoise_step",
        lambda rng, dt, g: step_args(rng, dt, g, eta=0.3, prediction_type="v_prediction", clip=1.0),
    ),
    "denoise_step-sample-ddim": (
        "denoise_step",
        lambda rng, dt, g: step_args(rng, dt, g, eta=0.0, prediction_type="sample"),
    ),
    "denoise_step-no_noise": ("denoise_step", lambda rng, dt, g: step_args(rng, dt, g, with_noise=False)),
    "denoise_step-seed": (
        "denoise_step",
        lambda rng, dt, g: step_args(rng, dt, g, with_noise=False, seed=int(torch.randint(2**62, (), generator=rng))),
    ),
    "denoise_step-B0": ("denoise_step", lambda rng, dt, g: step_args(rng, dt, g, b=0, clip=2.0)),
}


def on_device(args, device):
    """``args`` with every tensor moved to ``device``, each a leaf again with its requires_grad."""
    return tuple(
        a.detach().to(device).requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args
    )


def assert_opcheck_passes(name, args, device="cpu"):
    result = torch.library.opcheck(getattr(torch.ops.softmix, name).default, on_device(args, device))
    assert result and all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "requires_grad"])
@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_opcheck(rng, case, requires_grad, device):
    name, make_args = OPCHECK_CASES[case]
    assert_opcheck_passes(name, make_args(rng, torch.float32, requires_grad), device)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["latent_transform", "mc_loss", "mc_loss-log_weights", "denoise_step"])
def test_opcheck_other_dtypes(rng, name, dtype, device):
    make_args = {
        "latent_transform": lt_args,
        "mc_loss": mc_args,
        "mc_loss-log_weights": lambda rng, dt, g: mc_args(rng, dt, g, bound="logmeanexp", log_weights=True),
        "denoise_step": step_args,
    }[name]
    assert_opcheck_passes(name.split("-")[0], make_args(rng, dtype, True), device)


def test_opcheck_backward_ops(rng, device):
    # the fused backward kernels are ops too; their fake kernels are what compile traces
    r, v, s = lt_args(rng, torch.float32, False, per_position=True)
    assert_opcheck_passes("latent_transform_backward", (torch.randn_like(r), r, v, s), device)
    pred, target, weight, bound, temperature, log_weights = mc_args(
        rng, torch.float32, False, bound="logmeanexp", temperature=0.5, log_weights=True
    )
    _, errors = torch.ops.softmix.mc_loss_with_errors(pred, target, weight, bound, temperature, log_weights)
    args = (torch.rand(pred.shape[1]), pred, target, weight, errors, bound, temperature, True)
    assert_opcheck_passes("mc_loss_backward", args, device)
    assert_opcheck_passes("mc_loss_backward", (*args, log_weights, True), device)
    x, m, a_t, a_prev, _, eta, prediction_type, clip, _ = step_args(
        rng, torch.float32, False, eta=0.5, prediction_type="v_prediction", clip=1.0
    )
    assert_opcheck_passes(
        "denoise_step_backward",
        (torch.randn_like(x), torch.randn_like(x), x, m, a_t, a_prev, eta, prediction_type, clip, True),
        device,
    )



def test_backward_ops_skip_the_gradient_not_asked_for(rng):
    """need_grad_target / need_grad_log_weights / need_grad_noise = False: that output is an
    empty (0,) tensor, the other gradients are the same bits as with it, and the fake kernels
    agree (opcheck)."""
    pred, target, weight, bound, temperature, log_weights = mc_args(
        rng, torch.float32, False, bound="logmeanexp", temperature=0.5, log_weights=True
    )
    _, errors = torch.ops.softmix.mc_loss_with_errors(pred, target, weight, bound, temperature, log_weights)
    args = (torch.rand(pred.shape[1]), pred, target, weight, errors, bound, temperature)
    full, skipped = (torch.ops.softmix.mc_loss_backward(*args, need, log_weights, True) for need in (True, False))
    assert full[1].shape == target.shape and skipped[1].shape == (0,)
    assert torch.equal(full[0], skipped[0]) and torch.equal(full[2], skipped[2])
    assert_opcheck_passes("mc_loss_backward", (*args, False))
    full, skipped = (torch.ops.softmix.mc_loss_backward(*args, True, log_weights, need) for need in (True, False))
    assert full[3].shape == log_weights.shape and skipped[3].shape == (0,)
    assert all(torch.equal(f, s) for f, s in zip(full[:3], skipped[:3]))
    assert_opcheck_passes("mc_loss_backward", (*args, True, log_weights, False))
    # without log_weights there is no gradient for them
    assert torch.ops.softmix.mc_loss_backward(*args, True)[3].shape == (0,)
    with pytest.raises(ValueError, match=r"mc_loss_backward.*need_grad_log_weights.*no log_weights"):
        torch.ops.softmix.mc_loss_backward(*args, True, None, True)

    x, m, a_t, a_prev, _, eta, prediction_type, clip, _ = step_args(rng, torch.float32, False, eta=0.5)
    args = (torch.randn_like(x), torch.randn_like(x), x, m, a_t, a_prev, eta, prediction_type, clip)
    full, skipped = (torch.ops.softmix.denoise_step_backward(*args, need) for need in (True, False))
    assert full[2].shape == x.shape and skipped[2].shape == (0,)
    assert torch.equal(full[0], skipped[0]) and torch.equal(full[1], skipped[1])
    assert_opcheck_passes("denoise_step_backward", (*args, False))

# --------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------


def smd_pipeline(r, v, s, pred, target, weight, logits, x, m, a_t, a_prev, noise):
    """All three ops in one graph, each feeding the next: head, loss, sampler step (and the
    loss of a finite mixture whose weights are a softmax of logits)."""
    y = ops.latent_transform(r, v, s)
    loss = ops.mc_loss(pred + y.mean(), target, weight, "logmeanexp", 0.5)
    jensen = ops.mc_loss(pred, target, weight)
    mixture = ops.mc_loss(pred, target, weight, "logmeanexp", 0.5, log_weights=torch.log_softmax(logits, 0))
    x_prev, x0 = ops.denoise_step(x, m * loss.mean(), a_t, a_prev, noise, 0.5, "v_prediction", 1.5)
    return y.square().sum() + loss.sum() + jensen.sum() + mixture.sum() + x_prev.square().sum() + x0.sum()


def pipeline_inputs(rng, n=6, b=4):
    return [
        randn(rng, n, 5).float().requires_grad_(),
        (0.4 * randn(rng, 2, n, 5)).float().requires_grad_(),
        uniform(rng, 2, n, low=0.5, high=1.5).float().requires_grad_(),
        randn(rng, 3, b, 2, 3).float().requires_grad_(),
        randn(rng, b, 2, 3).float().requires_grad_(),
        uniform(rng, b, low=0.1, high=2.0).float().requires_grad_(),
        randn(rng, 3, b).float().requires_grad_(),
        randn(rng, b, 3, 4).float().requires_grad_(),
        randn(rng, b, 3, 4).float().requires_grad_(),
        torch.full((b,), 0.4),
        torch.full((b,), 0.5),
        randn(rng, b, 3, 4).float().requires_grad_(),
    ]


def run_and_grad(fn, inputs):
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    out = fn(*leaves)
    out.backward()
    return out.detach(), [t.grad for t in leaves]


def assert_matches_eager(compiled, rng, device, n=6, b=4):
    inputs = on_device(pipeline_inputs(rng, n, b), device)
    expected, expected_grads = run_and_grad(smd_pipeline, inputs)
    got, grads = run_and_grad(compiled, inputs)
    assert_close_to_reference(got, expected.double(), torch.float32, "compiled output")
    for i, (g, e) in enumerate(zip(grads, expected_grads)):
        assert (g is None) == (e is None), i
        if e is not None:
            assert_close_to_reference(g, e.double(), torch.float32, f"compiled grad of input {i}")


def test_torch_compile_fullgraph_of_all_three_ops_matches_eager(rng, device):
    torch._dynamo.reset()
    assert_matches_eager(torch.compile(smd_pipeline, fullgraph=True), rng, device)


def test_torch_compile_fullgraph_with_dynamic_shapes_matches_eager(rng, device):
    # the fake kernels must give symbolic shapes: one graph serves several batch sizes
    torch._dynamo.reset()
    compiled = torch.compile(smd_pipeline, fullgraph=True, dynamic=True)
    # sizes distinct from each other and from the fixed dims (2, 3, 4, 5), or duck sizing
    # would tie them together and the second call would recompile
    assert_matches_eager(compiled, rng, device, n=7, b=9)
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert_matches_eager(compiled, rng, device, n=11, b=13)
