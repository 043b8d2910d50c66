"""@per_sample equals the per-sample Python loop: outputs and gradients.

The oracle is the undecorated function itself, called on one example at a
time: ``per_sample(fn)(x)`` must equal ``stack([fn(x[i]) for i in range(B)])``.
"""

from __future__ import annotations

import importlib.util
import itertools
import tempfile
from pathlib import Path

import pytest
import torch
import torch.utils._pytree as pytree
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import adaptnet
from adaptnet.errors import DynamicError, PerSampleError

# -- the oracle ------------------------------------------------------------------------


def loop(fn, *args):
    """Call ``fn`` on each example alone and stack the results (Python numbers too)."""
    outs = [fn(*(a[i] for a in args)) for i in range(len(args[0]))]
    outs = [pytree.tree_map(lambda v: v if isinstance(v, torch.Tensor) else torch.tensor(v), o)
            for o in outs]
    return pytree.tree_map(lambda *xs: torch.stack(xs), *outs)


def outputs_and_grads(fn, params, *args):
    """Outputs and the gradients of a fixed random projection of them."""
    args = [a.detach().clone().requires_grad_(a.is_floating_point()) for a in args]
    out = fn(*args)
    leaves = [v for v in pytree.tree_leaves(out) if isinstance(v, torch.Tensor)]
    gen = torch.Generator().manual_seed(7)
    loss = sum((v.float() * torch.randn(v.shape, generator=gen)).sum() for v in leaves
               if v.is_floating_point())
    for p in params:
        p.grad = None
    if isinstance(loss, torch.Tensor) and loss.requires_grad:
        loss.backward()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    grads += [a.grad if a.grad is not None else torch.zeros_like(a) for a in args
              if a.is_floating_point()]
    return out, grads


def assert_matches_loop(fn, params, *args, atol=1e-5):
    got, got_grads = outputs_and_grads(adaptnet.per_sample(fn), params, *args)
    want, want_grads = outputs_and_grads(lambda *a: loop(fn, *a), params, *args)
    got_leaves, got_spec = pytree.tree_flatten(got)
    want_leaves, want_spec = pytree.tree_flatten(want)
    assert got_spec == want_spec
    for g, w in zip(got_leaves, want_leaves, strict=True):
        if not isinstance(g, torch.Tensor):  # the same Python value for every sample
            g = torch.tensor(g).expand(w.shape)
        assert g.shape == w.shape, (g.shape, w.shape)
        torch.testing.assert_close(g.to(w.dtype), w, atol=atol, rtol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, atol=atol, rtol=1e-5)


# -- the textbook examples -------------------------------------------------------------


class Textbook(nn.Module):
    """The issue's network: one shared output layer on both paths."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(10, 50)
        self.out = nn.Linear(50, 1)
        self.relu = nn.ReLU()

    def one(self, x):
        x = self.relu(self.hidden(x))
        if x.sum() > 0:
            x = self.out(x)
        else:
            x = self.out(-x)
        return x

    forward = adaptnet.per_sample(one)


def test_textbook_branch_as_a_method():
    model = Textbook()
    with torch.no_grad():
        model.hidden.bias.fill_(-1.0)
    x = torch.randn(33, 10) * torch.tensor([0.01, 5.0]).repeat(17)[:33, None]
    # ReLU outputs sum to 0 (the else path) exactly when every unit is dead: the small rows
    assert_matches_loop(model.one, list(model.parameters()), x)
    y = model(x)  # the decorated forward, called the normal way
    torch.testing.assert_close(y, loop(model.one, x))
    sums = torch.relu(model.hidden(x)).sum(1)
    assert (sums > 0).any() and (sums <= 0).any()


@pytest.mark.parametrize("rows", ["positive", "negative", "one", "empty"])
def test_textbook_edge_batches(rows):
    model = Textbook()
    x = torch.randn(6, 10)
    if rows == "one":
        x = x[:1]
    if rows == "empty":
        x = x[:0]
    with torch.no_grad():
        model.hidden.bias.fill_({"positive": 5.0, "negative": -50.0}.get(rows, 0.0))
    y = model(x)
    assert y.shape == (len(x), 1)
    if len(x):
        assert_matches_loop(model.one, list(model.parameters()), x)


def test_shared_layer_until_the_norm_is_small():
    layer = nn.Linear(4, 4)
    with torch.no_grad():
        layer.weight.mul_(0.5 / torch.linalg.matrix_norm(layer.weight, 2))
        layer.bias.zero_()

    def shrink(x):
        steps = 0
        while x.norm() > 0.1:
            x = layer(x)
            steps += 1
        return x, steps

    x = torch.randn(9, 4) * torch.logspace(-2, 1, 9)[:, None]  # from 0 to many steps
    assert_matches_loop(shrink, list(layer.parameters()), x)
    _, steps = adaptnet.per_sample(shrink)(x)
    assert steps.dtype == torch.int64 and steps.min() == 0 and steps.max() >= 4


def test_branch_nested_in_a_loop_with_break_and_continue():
    a, b = nn.Linear(5, 5), nn.Linear(5, 5)

    def f(x):
        h = x
        for i in range(6):
            if h[0] > 1.5:
                break
            if h.mean() > 0:
                h = torch.tanh(a(h)) + i
                continue
            h = b(h) * 2
        return h

    assert_matches_loop(f, [*a.parameters(), *b.parameters()], torch.randn(40, 5))


def test_early_return_elif_and_python_conditions():
    lin = nn.Linear(3, 3)
    scale = 2.0

    def f(x, flip=True):
        if flip:  # a Python condition: no partition
            x = -x
        if x[0] > 0.5:
            return lin(x) * scale
        elif x[1] > 0:
            y = x.exp()
        else:
            y = x.sin()
        return y + 1

    x = torch.randn(30, 3)
    assert_matches_loop(f, list(lin.parameters()), x)
    torch.testing.assert_close(adaptnet.per_sample(f)(x, flip=False),
                               loop(lambda v: f(v, False), x))


def test_for_over_modules_and_over_a_tensor_and_lists():
    layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

    def f(x, seq):
        outs = []
        for layer in layers:
            if x.sum() < 0:
                x = -x
            x = layer(x)
            outs.append(x)
        total = x * 0
        for row in seq:  # seq: (T, 4) per sample
            total = total + row * x
        for k, (u, v) in enumerate(itertools.pairwise(outs)):
            total = total + (u - v) * k
        return torch.stack(outs), total

    assert_matches_loop(f, list(layers.parameters()), torch.randn(12, 4), torch.randn(12, 5, 4))


def test_structured_inputs_and_outputs_and_python_values_pass_through():
    w = torch.randn(3)

    def f(pair, scale, name="k"):
        a, b = pair["a"], pair["b"]
        if a.sum() > b.sum():
            out = {"v": a * w * scale, "n": len(name)}
        else:
            out = {"v": b - w, "n": len(name)}
        return out

    pair = {"a": torch.randn(7, 3), "b": torch.randn(7, 3)}
    got = adaptnet.per_sample(f)(pair, 3.0)
    want = [f({"a": pair["a"][i], "b": pair["b"][i]}, 3.0) for i in range(7)]
    torch.testing.assert_close(got["v"], torch.stack([o["v"] for o in want]))
    assert got["n"] == 1  # the same on every path: stays a Python int


def test_no_grad_and_train_eval_modes():
    net = nn.Sequential(nn.Linear(6, 32), nn.Dropout(0.5), nn.Linear(32, 2))

    @adaptnet.per_sample
    def f(x):
        if x[0] > 0:
            return net(x)
        return net(x * 2)

    x = torch.randn(20, 6)
    net.eval()
    torch.testing.assert_close(f(x), loop(lambda v: net(v) if v[0] > 0 else net(v * 2), x))
    with torch.no_grad():
        assert f(x).grad_fn is None
    net.train()
    torch.manual_seed(0)
    a, b = f(x), f(x)
    assert not torch.equal(a, b)  # dropout is live in training mode
    assert f(x).requires_grad


def test_with_and_try_around_straight_line_code():
    lin = nn.Linear(3, 3)

    def f(x):
        with torch.no_grad():
            scale = x.abs().max() + 1  # a per-example constant, no gradient
        try:
            y = lin(x) / scale
        except ZeroDivisionError:
            y = x
        if y.sum() > 0:
            y = y * 2
        return y

    assert_matches_loop(f, list(lin.parameters()), torch.randn(12, 3))


def test_variables_kept_across_paths_and_deleted():
    def f(x):
        y = x * 2
        if x.sum() > 0:
            z = y + 1
            del y
            y = z
        return y

    assert_matches_loop(f, [], torch.randn(10, 2))


@pytest.mark.slow
def test_eager_parity_under_torch_compile():
    model = Textbook()
    x = torch.randn(16, 10)
    compiled = torch.compile(model, backend="aot_eager")  # @per_sample itself runs eagerly
    torch.testing.assert_close(compiled(x), model(x))


def test_counts_macs_per_sample():
    big, small = nn.Linear(8, 64), nn.Linear(8, 1)

    @adaptnet.per_sample
    def f(x):
        if x[0] > 0:
            return big(x).sum(-1, keepdim=True)
        return small(x)

    x = torch.randn(10, 8)
    x[:4, 0] = 1.0
    x[4:, 0] = -1.0
    with adaptnet.count_macs(batch_size=10) as macs:
        f(x)
    assert macs.total == 4 * 8 * 64 + 6 * 8
    torch.testing.assert_close(macs.per_sample, torch.tensor([512.0] * 4 + [8.0] * 6,
                                                             dtype=torch.float64))


# -- random programs from a small grammar of the supported statements -------------------

EXPRS = ["A(h)", "torch.tanh(B(h))", "h * 0.5 + 1", "h.flip(0)", "torch.relu(h) - h.mean()",
         "h * (h.sum() > 0)", "h / (1 + h.norm())"]
CONDS = ["h.sum() > {c}", "h[0] > {c}", "h.norm() < {c}", "h.max() > {c}", "h.mean() <= {c}",
         "FLAG"]
_names = itertools.count()


def _block(data, depth: int, loop: bool, pad: str, in_for: bool = False) -> list[str]:
    lines = []
    for _ in range(data.draw(st.integers(1, 3))):
        kinds = ["assign", "assign", "count"] + (["if", "for", "while"] if depth < 3 else [])
        kinds += ["jump"] if loop else []
        kinds += ["return"] if depth else []
        kind = data.draw(st.sampled_from(kinds))
        cond = data.draw(st.sampled_from(CONDS)).format(c=data.draw(st.sampled_from(
            ["-1.0", "0.0", "0.5", "2.0"])))
        expr = data.draw(st.sampled_from(EXPRS + (["h + i"] if in_for else [])))
        if kind == "assign":
            lines.append(f"{pad}h = {expr}")
        elif kind == "count":
            lines.append(f"{pad}n = n + 1")
        elif kind == "return":
            lines += [f"{pad}if {cond}:", f"{pad}    return {expr}, n"]
        elif kind == "jump":
            jump = data.draw(st.sampled_from(["break", "continue"]))
            lines += [f"{pad}if {cond}:", f"{pad}    {jump}"]
        elif kind == "if":
            lines += [f"{pad}if {cond}:", *_block(data, depth + 1, loop, pad + "    ", in_for)]
            if data.draw(st.booleans()):
                lines += [f"{pad}else:", *_block(data, depth + 1, loop, pad + "    ", in_for)]
        elif kind == "for":
            lines += [f"{pad}for i in range({data.draw(st.integers(0, 3))}):",
                      *_block(data, depth + 1, True, pad + "    ", True)]
        else:  # a per-sample while loop that must end: t counts its iterations
            t = f"t{next(_names)}"
            lines += [f"{pad}{t} = h.sum() * 0", f"{pad}while ({cond}) & ({t} < 3):",
                      f"{pad}    {t} = {t} + 1",
                      *_block(data, depth + 1, True, pad + "    ", in_for)]
    return lines


_PROGRAMS = Path(tempfile.mkdtemp(prefix="adaptnet-programs-"))


@settings(max_examples=80, deadline=None)
@given(data=st.data(), rows=st.integers(0, 9), flag=st.booleans())
def test_random_programs_equal_the_loop(data, rows, flag):
    body = _block(data, 0, False, "    ")
    source = "\n".join(["import torch", "", "", "def f(h):", "    n = 0", *body,
                        "    return h, n", ""])
    path = _PROGRAMS / f"program_{next(_names)}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(rows)
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    module.A, module.B, module.FLAG = a, b, flag
    x = torch.randn(rows, 4) * 2
    if rows == 0:
        out, _ = adaptnet.per_sample(module.f)(x)
        assert out.shape == (0, 4), source
        return
    try:
        assert_matches_loop(module.f, [*a.parameters(), *b.parameters()], x, atol=1e-4)
    except Exception as e:
        raise AssertionError(f"program:\n{source}") from e


# -- the row-wise fast path agrees with the loop, op by op ----------------------------

W = torch.randn(4, 5)
OPS = [  # per-sample x: (3, 4); dims refer to the example, not the batch
    lambda x: x.sum(), lambda x: x.sum(0), lambda x: x.sum(dim=(0, 1), keepdim=True),
    lambda x: x.mean(-1), lambda x: x.amax(), lambda x: x.max(), lambda x: x.max(0).values,
    lambda x: x.max(1)[1], lambda x: x.min(), lambda x: x.prod(1), lambda x: x.norm(),
    lambda x: x.norm(dim=0), lambda x: torch.linalg.vector_norm(x, 1), lambda x: x.all() * 1.0,
    lambda x: x.softmax(0), lambda x: torch.log_softmax(x, dim=-1), lambda x: x.cumsum(0),
    lambda x: x.argmax(0), lambda x: x.logsumexp(0), lambda x: x.flatten(),
    lambda x: x.view(-1), lambda x: x.reshape(4, 3), lambda x: x.reshape(x.shape[1], -1),
    lambda x: x.view(x.size(0), -1), lambda x: x.transpose(0, 1), lambda x: x.permute(1, 0),
    lambda x: x.t(), lambda x: x.unsqueeze(0), lambda x: x.unsqueeze(-1),
    lambda x: x[:, None].squeeze(), lambda x: x.squeeze(0), lambda x: x[1], lambda x: x[..., 2],
    lambda x: x[1:, ::2], lambda x: torch.cat([x, x], 0), lambda x: torch.cat([x, x], dim=-1),
    lambda x: torch.stack([x, x]), lambda x: torch.stack([x, x], -1), lambda x: x.chunk(3)[1],
    lambda x: x.split(2, dim=1)[0], lambda x: x.unbind()[2], lambda x: x @ W,
    lambda x: W.t() @ x.t(), lambda x: x @ x.t(), lambda x: x * W[:, 0].reshape(-1)[:4],
    lambda x: x + W[0, :4], lambda x: x * torch.ones(3, 4), lambda x: x.sum(0) * W[0, :4],
    lambda x: torch.where(x > 0, x, x * 0.1), lambda x: x.clamp(min=-0.5, max=0.5),
    lambda x: torch.maximum(x, -x), lambda x: x.max(x.flip(0)), lambda x: x.shape[0] * x,
    lambda x: x.ndim * x, lambda x: x.float() + x.to(torch.float64).sum(),
    lambda x: torch.zeros_like(x) + 1, lambda x: nn.functional.layer_norm(x, (4,)),
    lambda x: nn.functional.gelu(x), lambda x: x.T, lambda x: x.flip(0),
    lambda x: x.sum().flatten(), lambda x: x.sum().view(-1),
]


@pytest.mark.parametrize("op", range(len(OPS)))
def test_each_operation_equals_the_loop(op):
    assert_matches_loop(OPS[op], [], torch.randn(5, 3, 4))


def test_the_fast_path_is_taken_for_row_wise_code_and_not_for_the_rest():
    from adaptnet.dynamic._per_sample._rowwise import NotRowwise, rowwise

    x = torch.randn(5, 3, 4)
    before = x.clone()
    with rowwise([x]) as mode:
        y = nn.functional.linear(torch.relu(x), W.t()).sum()
        assert y.shape == () and mode.is_batched(y)  # inside, shapes are per sample
        assert x.shape == (3, 4) and x.dim() == 2 and x.size(1) == 4
        b = W.sum()  # nothing per-sample: not batched
        assert not mode.is_batched(b)
        for bad in (lambda: x.T, lambda: x.add_(1), lambda: x.item(), lambda: W @ x,
                    lambda: x + torch.ones(5, 3, 4), lambda: bool(x.sum() > 0),
                    lambda: nn.functional.relu(x, inplace=True), lambda: x.relu_(),
                    lambda: x.flip(0)):
            with pytest.raises(NotRowwise):
                bad()
    assert y.shape == (5,) and torch.equal(x, before)  # the refused x.add_(1) never ran
    torch.testing.assert_close(y, torch.relu(x).matmul(W).sum((1, 2)))


def test_random_draws_differ_per_sample():
    @adaptnet.per_sample
    def noisy(x):
        return x + torch.randn(3)  # the per-sample loop draws anew for each sample

    out = noisy(torch.zeros(6, 3))
    assert len({tuple(row.tolist()) for row in out}) == 6


def test_conv_and_pool_per_image():
    conv = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(0), nn.Linear(4, 3))

    def f(img):  # img: (C, H, W)
        if img.mean() > 0:
            return conv(img)
        return conv(img.flip(-1)) * 2

    assert_matches_loop(f, list(conv.parameters()), torch.randn(8, 2, 6, 6))


# -- errors ----------------------------------------------------------------------------


def test_tensor_used_as_python_bool_names_the_line():
    def f(x):
        y = x * 2
        return y if y.sum() > 0 else -y  # the line checked below

    line = f.__code__.co_firstlineno + 2
    with pytest.raises(PerSampleError, match=rf"line {line}: a per-sample tensor is used as a "
                       r"Python value .*torch.where") as info:
        adaptnet.per_sample(f)(torch.randn(4, 3))
    assert info.value.lineno == line and info.value.filename == __file__


@pytest.mark.parametrize(("body", "message"), [
    ("    yield x", r"generators and coroutines \(yield/await\)"),
    ("    global G\n    G = x", r"`global` would let each sample write one shared variable"),
    ("    self.last = x", r"assignment to the attribute `self.last`.*Return the value"),
    ("    if x.sum() > 0:\n        self.n += 1", r"assignment to the attribute `self.n`"),
    ("    with torch.no_grad():\n        if x.sum() > 0:\n            x = -x",
     r"if/while/for/return/break/continue inside `with` cannot be split per sample. Move "
     r"the `with` inside the branches"),
    ("    try:\n        return x\n    except ValueError:\n        pass",
     r"if/while/for/return/break/continue inside `try` cannot be split per sample"),
    ("    while x.sum() > 0:\n        x = x - 1\n    else:\n        x = x", r"`while \.\.\. else`"),
    ("    for i in range(3):\n        x = x + i\n    else:\n        x = x", r"`for \.\.\. else`"),
    ("    match x:\n        case _:\n            pass", r"`match` statements are not supported"),
    ("    return super().forward(x)", r"zero-argument `super\(\)`.*super\(ClassName, self\)"),
])
def test_unsupported_code_is_refused_when_decorated(tmp_path, body, message):
    path = tmp_path / "user_code.py"
    path.write_text(f"import torch\n\n\ndef f(self, x):\n{body}\n    return x\n")
    namespace = {}
    exec(compile(path.read_text(), str(path), "exec"), namespace)
    with pytest.raises(PerSampleError, match=rf"user_code.py, line [5-9]: {message}") as info:
        adaptnet.per_sample(namespace["f"])
    assert info.value.filename == str(path) and info.value.lineno >= 5


def test_no_source_and_notebook_source():
    code = "def f(x):\n    if x.sum() > 0:\n        return x\n    return -x\n"
    namespace = {}
    exec(compile(code, "<stdin>", "exec"), namespace)
    with pytest.raises(PerSampleError, match=r"cannot read the source of 'f'.*notebook cell"):
        adaptnet.per_sample(namespace["f"])
    import linecache  # IPython keeps each cell's source in linecache, under a cell name

    cell = "<ipython-input-3-0123456789ab>"
    linecache.cache[cell] = (len(code), None, code.splitlines(True), cell)
    exec(compile(code, cell, "exec"), namespace)
    f = adaptnet.per_sample(namespace["f"])
    torch.testing.assert_close(f(torch.tensor([[1.0], [-2.0]])), torch.tensor([[1.0], [2.0]]))


def test_runtime_errors_name_the_variable_and_line():
    def shapes(x):
        if x.sum() > 0:
            y = x[:2]
        else:
            y = x
        return y

    with pytest.raises(PerSampleError, match=r"`y` is a \(2,\) float32 tensor on one path and "
                       r"a \(3,\) float32 tensor on another. Per-sample values must agree"):
        adaptnet.per_sample(shapes)(torch.tensor([[1.0, 1, 1], [-1, -1, -1]]))

    def unset(x):
        if x.sum() > 0:
            y = x
        return y * 2

    line = unset.__code__.co_firstlineno + 1
    with pytest.raises(PerSampleError, match=rf"`y` is not set for some samples: only some "
                       rf"paths through line {line} assign it"):
        adaptnet.per_sample(unset)(torch.tensor([[1.0], [-1.0]]))
    torch.testing.assert_close(adaptnet.per_sample(unset)(torch.tensor([[1.0]])),
                               torch.tensor([[2.0]]))  # every sample set it: fine

    def vector_test(x):
        if x > 0:
            x = -x
        return x

    with pytest.raises(PerSampleError, match=r"the `if` test is a tensor of shape \(3,\) per "
                       r"sample.*`.any\(\)`, `.all\(\)`"):
        adaptnet.per_sample(vector_test)(torch.randn(2, 3))

    def forever(x):
        while x.sum() > 0:
            x = x + 1
        return x

    with pytest.raises(PerSampleError, match=r"the while loop ran 50 iterations and 1 "
                       r"sample\(s\) still satisfy its condition. Raise the bound"):
        adaptnet.per_sample(forever, max_iters=50)(torch.tensor([[1.0], [-1.0]]))

    def counter(x):
        if x.sum() > 0:
            tag = "pos"
        else:
            tag = "neg"
        return x, tag

    with pytest.raises(PerSampleError, match=r"`tag` differs between paths \('pos', 'neg'\)"):
        adaptnet.per_sample(counter)(torch.tensor([[1.0], [-1.0]]))


def test_nested_per_sample_functions_are_refused():
    def double(v):
        return v * 2

    inner = adaptnet.per_sample(double)

    @adaptnet.per_sample
    def outer(x):
        return inner(x) + 1

    with pytest.raises(PerSampleError, match=r"double\(\) was called from inside another "
                       r"@per_sample function.*double.per_example"):
        outer(torch.randn(3, 2))
    assert torch.equal(inner(torch.ones(2, 1)), torch.full((2, 1), 2.0))  # fine on its own
    assert inner.per_example is double  # the advice names the undecorated function


def test_bad_arguments():
    def f(x, y=None):
        return x

    with pytest.raises(DynamicError, match=r"max_iters must be a positive int, got 0"):
        adaptnet.per_sample(f, max_iters=0)
    with pytest.raises(PerSampleError, match=r"expected a function or a forward method, got "
                       r"Linear"):
        adaptnet.per_sample(nn.Linear(2, 2))
    g = adaptnet.per_sample(f)
    with pytest.raises(DynamicError, match=r"argument `x` is a 0-d tensor"):
        g(torch.tensor(1.0))
    with pytest.raises(DynamicError, match=r"disagree in batch size \(`x` has 3, `y` has 4\)"):
        g(torch.zeros(3, 1), torch.zeros(4, 1))
    with pytest.raises(DynamicError, match=r"got no tensor argument to split"):
        g(1.0)
    with pytest.raises(TypeError):
        g()
