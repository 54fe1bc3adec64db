"""one GPU: forward+backward of per-token log-probs and entropy (RL) vs our loss, verl, torch.compile, eager.

The `rl` suite. For each shape N×D×V and input kind, in this one
process, every method computes the per-token log-probabilities and entropy of softmax(e·cᵀ / T)
and the gradients of  Σ_i w1_i·log_prob_i + Σ_i w2_i·entropy_i  with respect to e and c, for fixed
random weights w1, w2 [N] (an RL loss weights every token differently):

  vpcce_log_probs    ours: linear_log_probs(e, c, t, temperature=T, impl="triton")
  vpcce_loss_memory  our loss in its recompute (memory-first) mode, the bar's reference:
                     linear_cross_entropy(e, c, t, reduction="mean", grad_in_forward=False),
                     its backward from the mean loss (T plays no part: it has no temperature)
  verl               verl.utils.kernel.linear_cross_entropy(hidden, weight, labels, T, "none")
                     → (log-probs, entropy), where it imports (it needs CUDA and D % 128 == 0)
  torch_compile      torch.compile(dynamic=False) of the unfused computation: logits = e @ c.T in
                     the input dtype, float32 log_softmax(logits / T), gather, entropy
  eager              the same, uncompiled (skipped where its estimated memory does not fit)

Per method: median ms of the forward+backward (CUDA events, after warm-up; the first call, which
compiles, is timed on its own), peak MiB added (inputs excluded, gradients included), relative
errors ‖x − ref‖/‖ref‖ of log-probs, entropy, dE and dC against float64 (computed on the device,
chunked over tokens; the loss row against the float64 mean loss and its gradients), TFLOP/s
(8·N·D·V for the methods that recompute the logits in the backward, 6·N·D·V for the unfused ones)
and the same-run ratios to vpcce_loss_memory (the bar: vpcce_log_probs ≤ 1.1×), to verl and
to torch_compile.
"""

from __future__ import annotations

import os
import time

import charts
import tables as R
from inputs import DTYPES, KINDS, check_kinds, make_inputs, parse_shapes
from references import fraction_of_peak, rel_err, tflops
from tables import fmt, short_error
from timing import free_memory, is_oom, setup_device, sync, time_calls

DEFAULT_SHAPES = ["8192x4096x128256", "8192x2304x256000", "16384x4096x32064"]
METHODS = ["vpcce_log_probs", "vpcce_loss_memory", "verl", "torch_compile", "eager"]
LABELS = {"vpcce_log_probs": "ours linear_log_probs", "vpcce_loss_memory": "ours loss (memory-first)",
          "verl": "verl fused kernel", "torch_compile": "torch.compile (unfused)", "eager": "eager (unfused)"}
BAR = 1.1  # fwd+bwd of log-probs and entropy ≤ 1.1 × the loss's recompute mode
EAGER_BYTES_PER_LOGIT = 40  # conservative estimate of the unfused computation's peak per N·V element


def add_args(p):
    p.add_argument("--shapes", default=",".join(DEFAULT_SHAPES), help="comma list of NxDxV")
    p.add_argument("--kinds", default="random", help=f"comma list of {KINDS} (all in this process)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {METHODS}")
    p.add_argument("--temperature", type=float, default=1.0, help="the policy's temperature T (e.g. 0.7)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--impl", default=None,
                   help="impl= of our two methods (default: triton on CUDA, torch on CPU; triton on CPU needs "
                        "TRITON_INTERPRET=1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=3,
                   help="warm-up calls (at least 2), the first one, which compiles, timed on its own")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--max-seconds", type=float, default=4.0,
                   help="cap the timed reps of one measurement to about this long (≥ 3 reps)")
    p.add_argument("--no-check", action="store_true", help="skip the float64 references and the errors")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="bf16 matmul peak for the %% column (default: measure an 8192³ matmul)")
    p.add_argument("--eager-max-gib", type=float, default=None,
                   help=f"skip eager where N·V·{EAGER_BYTES_PER_LOGIT} bytes exceed this (default: 80%% of the "
                        "free GPU memory)")
    p.add_argument("--budget-s", type=float, default=225.0,
                   help="start no new method after this many seconds (the rest is recorded as not run)")


def shapes_of(args) -> list[tuple[int, int, int]]:
    try:
        return parse_shapes(args.shapes, DEFAULT_SHAPES)
    except ValueError as err:
        raise SystemExit(f"--shapes: {err}") from None


# ----------------------------------------------------------------------------------------------
# float64 reference
# ----------------------------------------------------------------------------------------------
def reference(e, c, t, w_lp, w_ent, temperature: float, need_grads: bool = True, chunk_bytes: int = 1 << 30,
              out_dtype=None) -> dict:
    """float64 per-token log-probs and entropy of softmax(e·cᵀ / T), and the gradients of
    Σ w_lp·log_probs + Σ w_ent·entropy with respect to e [N, D] and c [V, D].

    Chunked over tokens (a chunk's [k, V] float64 logits take about `chunk_bytes`); dC is summed
    over the chunks in float64. With z = e·cᵀ/T, p = softmax(z), H = −Σ p·log p:
        ∂log p_t/∂z_j = [j = t] − p_j,   ∂H/∂z_j = p_j·(Σ_k p_k z_k − z_j) = −p_j·(H + log p_j)
    so G = ∂out/∂z = w_lp·onehot(t) − p·(w_lp + w_ent·(H + log p)), and dE = G·c / T, dC = Gᵀ·e / T.
    Returns {lp, ent} (float64 [N]) and {de, dc} in `out_dtype` (default float32) when need_grads.
    """
    import torch

    out_dtype = out_dtype or torch.float32
    n, d = e.shape
    v = c.shape[0]
    dev = e.device
    with torch.no_grad():
        c64 = c.double()
        lp = torch.empty(n, dtype=torch.float64, device=dev)
        ent = torch.empty(n, dtype=torch.float64, device=dev)
        de = torch.empty(n, d, dtype=out_dtype, device=dev) if need_grads else None
        dc = torch.zeros(v, d, dtype=torch.float64, device=dev) if need_grads else None
        step = max(1, chunk_bytes // (8 * v))
        for i0 in range(0, n, step):
            i1 = min(n, i0 + step)
            e64 = e[i0:i1].double()
            tt = t[i0:i1]
            logp = e64 @ c64.T
            if temperature != 1.0:
                logp /= temperature
            logp -= torch.logsumexp(logp, dim=1, keepdim=True)  # log p, in place of z
            p = logp.exp()
            lp[i0:i1] = logp.gather(1, tt[:, None]).squeeze(1)
            h = -(p * logp).sum(1)
            ent[i0:i1] = h
            if need_grads:
                w1, w2 = w_lp[i0:i1].double(), w_ent[i0:i1].double()
                g = logp.add_(h[:, None]).mul_(w2[:, None]).add_(w1[:, None]).mul_(p).neg_()  # reuses log p
                del p
                g[torch.arange(i1 - i0, device=dev), tt] += w1
                if temperature != 1.0:
                    g /= temperature
                de[i0:i1] = (g @ c64).to(out_dtype)
                dc.addmm_(g.T, e64)  # in place: no [V, D] float64 temporary per chunk
                del g
            del logp, e64
        out = {"lp": lp, "ent": ent}
        if need_grads:
            out.update(de=de, dc=dc.to(out_dtype))
        del dc, c64
    return out


def build_references(e, c, t, w1, w2, args, device, need_rl: bool = True, need_loss: bool = True) -> dict:
    """The log-probs reference (temperature T, weights w1, w2) and the loss's (T = 1, w_lp = −1/N,
    w_ent = 0: the gradients of the mean cross-entropy), each where a selected method needs it."""
    import torch

    n = e.shape[0]
    t0 = time.perf_counter()
    rl = loss = None
    if need_rl:
        rl = reference(e, c, t, w1, w2, args.temperature)
        free_memory()
    if need_loss:
        loss_w = torch.full((n,), -1.0 / n, device=device)
        lo = reference(e, c, t, loss_w, torch.zeros_like(loss_w), 1.0)
        loss = {"loss": float(-lo["lp"].mean()), "de": lo["de"], "dc": lo["dc"]}
        del lo
        free_memory()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"rl": rl, "loss": loss, "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------------------------
# methods
# ----------------------------------------------------------------------------------------------
class Method:
    """`fn(e, c, t)` → (log_probs [N], entropy [N]) (output "rl") or a mean loss (output "loss")."""

    def __init__(self, name, fn, output="rl", flops_factor=8, needs_cuda=False, skip_reason="", note=""):
        self.name, self.fn, self.output, self.flops_factor = name, fn, output, flops_factor
        self.needs_cuda, self.skip_reason, self.note = needs_cuda, skip_reason, note

    def usable(self, device, n, d, v, args) -> tuple[bool, str]:
        if self.fn is None:
            return False, self.skip_reason or "unavailable"
        if self.needs_cuda and device.type != "cuda":
            return False, "needs CUDA"
        if self.name == "verl" and d % 128:
            return False, f"verl's kernels need D % 128 == 0 (D = {d})"
        if self.name == "eager" and device.type == "cuda":
            import torch

            need = n * v * EAGER_BYTES_PER_LOGIT
            limit = (args.eager_max_gib * 2**30 if args.eager_max_gib is not None
                     else 0.8 * torch.cuda.mem_get_info()[0])
            if need > limit:
                return False, f"estimated {need / 2**30:.0f} GiB > {limit / 2**30:.0f} GiB (--eager-max-gib)"
        return True, ""


def _ours(temperature: float, impl: str) -> Method:
    try:
        from vocab_parallel_cce import linear_log_probs
    except Exception as err:  # noqa: BLE001
        return Method("vpcce_log_probs", None, skip_reason=short_error(err))

    def fn(e, c, t):
        return linear_log_probs(e, c, t, temperature=temperature, impl=impl)

    return Method("vpcce_log_probs", fn, note=f"linear_log_probs(temperature={temperature:g}, impl={impl!r})")


def _loss_memory(impl: str) -> Method:
    try:
        from vocab_parallel_cce import linear_cross_entropy
    except Exception as err:  # noqa: BLE001
        return Method("vpcce_loss_memory", None, output="loss", skip_reason=short_error(err))

    def fn(e, c, t):
        return linear_cross_entropy(e, c, t, reduction="mean", grad_in_forward=False, impl=impl)

    return Method("vpcce_loss_memory", fn, output="loss",
                  note=f"linear_cross_entropy(reduction='mean', grad_in_forward=False, impl={impl!r}), T = 1")


def _verl_source() -> str:
    """Where verl came from: its folder and, for the local benchmark copy, the commit it records."""
    import verl

    root = os.path.dirname(os.path.dirname(os.path.abspath(verl.__file__)))
    commit = os.path.join(root, "COMMIT")
    if os.path.exists(commit):
        with open(commit) as f:
            return f"verl at commit {f.read().strip()[:12]} ({root})"
    try:
        from importlib.metadata import version

        return f"verl {version('verl')}"
    except Exception:  # noqa: BLE001
        return f"verl from {root}"


def _verl(temperature: float) -> Method:
    try:
        from verl.utils.kernel import kernels  # noqa: F401  (its Triton kernels: fail here, not in a call)
        from verl.utils.kernel.linear_cross_entropy import linear_cross_entropy as verl_lce

        source = _verl_source()
    except Exception as err:  # noqa: BLE001
        return Method("verl", None, skip_reason=f"not available ({short_error(err, 200)})")

    def fn(e, c, t):
        return verl_lce(e, c, t, float(temperature), "none")

    return Method("verl", fn, needs_cuda=True, note=f"{source}: linear_cross_entropy(hidden, weight, labels, "
                                                     f"{float(temperature)}, 'none')")


def unfused(temperature: float):
    """The computation a user would write: bf16 logits, then float32 log_softmax, gather, entropy."""
    import torch

    def fn(e, c, t):
        z = (e @ c.T).float()
        if temperature != 1.0:
            z = z / temperature
        logp = torch.log_softmax(z, dim=-1)
        lp = logp.gather(-1, t[:, None]).squeeze(-1)
        ent = -(logp.exp() * logp).sum(-1)
        return lp, ent

    return fn


def _torch_compile(temperature: float) -> Method:
    import torch

    try:
        import torch._dynamo

        # dynamic=False: one compilation per shape; keep dynamo from falling back to eager past its limit.
        for key in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, key):
                setattr(torch._dynamo.config, key, max(64, getattr(torch._dynamo.config, key)))
        fn = torch.compile(unfused(temperature), dynamic=False)
    except Exception as err:  # noqa: BLE001
        return Method("torch_compile", None, flops_factor=6, skip_reason=short_error(err))
    return Method("torch_compile", fn, flops_factor=6,
                  note="torch.compile(dynamic=False) of eager; its compilation is the first call")


def _eager(temperature: float) -> Method:
    return Method("eager", unfused(temperature), flops_factor=6,
                  note="z = (e @ c.T).float()" + (f" / {temperature:g}" if temperature != 1.0 else "")
                       + "; logp = log_softmax(z); lp = logp.gather(t); ent = −(logp.exp()·logp).sum()")


def build_methods(names: list[str], temperature: float, impl: str) -> list[Method]:
    factories = {"vpcce_log_probs": lambda: _ours(temperature, impl), "vpcce_loss_memory": lambda: _loss_memory(impl),
                 "verl": lambda: _verl(temperature), "torch_compile": lambda: _torch_compile(temperature),
                 "eager": lambda: _eager(temperature)}
    return [factories[n]() for n in names]


# ----------------------------------------------------------------------------------------------
# measuring
# ----------------------------------------------------------------------------------------------
def run_method(m: Method, e, c, t, w1, w2, ref, args, device) -> dict:
    import torch

    n, d = e.shape
    v = c.shape[0]
    rec: dict = {"method": m.name, "note": m.note, "errors": {}, "output": m.output,
                 "flops_count": f"{m.flops_factor}NDV"}
    ok, why = m.usable(device, n, d, v, args)
    if not ok:
        rec["skipped"] = why
        return rec
    e_g = e.detach().requires_grad_(True)
    c_g = c.detach().requires_grad_(True)

    def outputs():
        if m.output == "rl":
            lp, ent = m.fn(e_g, c_g, t)
            return (lp, ent), (lp * w1).sum() + (ent * w2).sum()
        loss = m.fn(e_g, c_g, t)
        return (loss,), loss

    def step():
        _, objective = outputs()
        return torch.autograd.grad(objective, (e_g, c_g))

    def record_error(phase, err):
        rec["errors"][phase] = ("OOM: " if is_oom(err) else "") + short_error(err)
        print(f"    {m.name} {phase}: {rec['errors'][phase]}", flush=True)

    try:
        t0 = time.perf_counter()
        step()
        sync()
        rec["first_call_s"] = time.perf_counter() - t0
        ms, mb = time_calls(step, max(1, args.warmup - 1), args.reps, args.max_seconds)
        flops = m.flops_factor * n * d * v
        rec.update(fwd_bwd_ms=ms, fwd_bwd_peak_mb=mb, tflops=tflops(flops, ms),
                   frac_peak=fraction_of_peak(flops, ms, args.peak_tflops))
    except Exception as err:  # noqa: BLE001
        record_error("fwd_bwd", err)
    free_memory()
    if ref is not None and not rec["errors"]:
        try:
            outs, objective = outputs()
            de, dc = torch.autograd.grad(objective, (e_g, c_g))
            sync()
            if m.output == "rl":
                r = ref["rl"]
                lp, ent = (x.detach() for x in outs)
                err_pos, err_neg = rel_err(lp, r["lp"]), rel_err(-lp, r["lp"])
                # verl's documentation does not say which sign it returns: check it against the reference
                rec["lp_sign"] = "log p" if err_pos <= err_neg else "−log p"
                rec["lp_rel_err"] = min(err_pos, err_neg)
                rec["ent_rel_err"] = rel_err(ent, r["ent"])
            else:
                r = ref["loss"]
                rec["loss"] = float(outs[0].detach())
                rec["loss_rel_err"] = abs(rec["loss"] - r["loss"]) / abs(r["loss"])
            rec["de_rel_err"] = rel_err(de, r["de"])
            rec["dc_rel_err"] = rel_err(dc, r["dc"])
            del outs, objective, de, dc
        except Exception as err:  # noqa: BLE001
            record_error("check", err)
    del e_g, c_g
    free_memory()
    return rec


def add_ratios(results: list[dict]) -> None:
    """Same-run ratios of fwd+bwd time: to vpcce_loss_memory, to verl, to torch_compile (same shape,
    kind and temperature)."""
    for base, key in (("vpcce_loss_memory", "ratio_loss_memory"), ("verl", "ratio_verl"),
                      ("torch_compile", "ratio_torch_compile")):
        R.add_ratio(results, "fwd_bwd_ms", key, base, lambda r: (tuple(r["shape"]), r["kind"], r.get("temperature")))


def run(args, out) -> dict:
    import torch

    import loss_suite

    from machine import machine_info

    names = [m for m in args.methods.split(",") if m]
    for name in names:
        if name not in METHODS:
            raise SystemExit(f"--methods: unknown method {name!r}; known: {METHODS}")
    kinds = check_kinds(args.kinds)
    if not args.temperature > 0:
        raise SystemExit("--temperature: expected a number > 0")
    shapes = shapes_of(args)
    t_start = time.time()
    deadline = t_start + args.budget_s
    device = setup_device(args.device)
    impl = args.impl or ("triton" if device.type == "cuda" else "torch")
    dtype = DTYPES[args.dtype]
    peak_source = loss_suite.measure_peak(args, device)
    print(f"bf16 matmul peak: {fmt(args.peak_tflops, '.0f')} TFLOP/s ({peak_source})", flush=True)
    methods = build_methods(names, args.temperature, impl)
    for m in methods:
        if m.fn is None:
            print(f"  {m.name}: unavailable ({m.skip_reason})", flush=True)
    doc = {"machine": machine_info(), "device": str(device), "impl": impl, "peak_tflops": args.peak_tflops,
           "peak_source": peak_source, "inputs": [], "results": []}
    partial = out.raw("partial.json")

    def save():  # after every row: a crash of the process keeps what was measured
        R.save_json({**doc, "suite": "rl", "args": vars(args)}, partial)

    for kind in kinds:
        for n, d, v in shapes:
            base = {"shape": [n, d, v], "kind": kind, "temperature": args.temperature}
            print(f"== {n}x{d}x{v} {kind} T={args.temperature:g}  ({time.time() - t_start:.0f}s)", flush=True)
            if time.time() > deadline:
                doc["results"] += [{**base, "method": m.name, "skipped": "not run: time budget (--budget-s)"}
                                   for m in methods]
                save()
                continue
            entry = dict(base)
            try:
                e, c, t = make_inputs(n, d, v, dtype, kind, device, args.seed)
                g = torch.Generator(device=device).manual_seed(args.seed + 7)
                w1 = torch.randn(n, device=device, generator=g)
                w2 = torch.randn(n, device=device, generator=g)
            except Exception as err:  # noqa: BLE001
                entry["error"] = short_error(err)
                doc["inputs"].append(entry)
                doc["results"] += [{**base, "method": m.name, "errors": {"inputs": entry["error"]}} for m in methods]
                save()
                free_memory()
                continue
            ref = None
            if not args.no_check:
                try:
                    outputs = {m.output for m in methods if m.fn is not None}
                    ref = build_references(e, c, t, w1, w2, args, device, "rl" in outputs, "loss" in outputs)
                    entry["ref_seconds"] = ref["seconds"]
                    if ref["loss"] is not None:
                        entry["ref_loss"] = ref["loss"]["loss"]
                    if ref["rl"] is not None:
                        entry.update(ref_mean_log_prob=float(ref["rl"]["lp"].mean()),
                                     ref_mean_entropy=float(ref["rl"]["ent"].mean()))
                    print(f"  float64 reference: {ref['seconds']:.1f}s, mean log-prob "
                          f"{fmt(entry.get('ref_mean_log_prob'), '.3f')}, mean entropy "
                          f"{fmt(entry.get('ref_mean_entropy'), '.3f')}, loss (T = 1) "
                          f"{fmt(entry.get('ref_loss'), '.3f')}", flush=True)
                except Exception as err:  # noqa: BLE001
                    entry["ref_error"] = short_error(err)
                    print(f"  float64 reference failed: {entry['ref_error']}", flush=True)
                    ref = None
                free_memory()
            doc["inputs"].append(entry)
            for m in methods:
                t0 = time.perf_counter()
                if time.time() > deadline:
                    rec = {"method": m.name, "skipped": "not run: time budget (--budget-s)"}
                else:
                    rec = run_method(m, e, c, t, w1, w2, ref, args, device)
                rec.update(base, seconds=time.perf_counter() - t0)
                doc["results"].append(rec)
                print(f"  {m.name:18s} " + (R.status(rec) or
                      f"{fmt(rec.get('fwd_bwd_ms'), '.2f')} ms  peak {fmt(rec.get('fwd_bwd_peak_mb'), '.0f')} MiB  "
                      f"first call {fmt(rec.get('first_call_s'), '.1f')}s  lp err {fmt(rec.get('lp_rel_err'), '.1e')}  "
                      f"ent err {fmt(rec.get('ent_rel_err'), '.1e')}  loss err {fmt(rec.get('loss_rel_err'), '.1e')}  "
                      f"dE err {fmt(rec.get('de_rel_err'), '.1e')}  dC err {fmt(rec.get('dc_rel_err'), '.1e')}")
                      + f"  ({rec['seconds']:.1f}s)", flush=True)
                add_ratios(doc["results"])
                save()
            del e, c, t, w1, w2, ref
            free_memory()
    add_ratios(doc["results"])
    doc["seconds"] = time.time() - t_start
    # Errors of single methods are recorded rows (as in the loss suite); a run that timed nothing fails.
    doc["exit_status"] = 0 if any(R.num(r.get("fwd_bwd_ms")) for r in doc["results"]) else 1
    return doc


# ----------------------------------------------------------------------------------------------
# table and chart
# ----------------------------------------------------------------------------------------------
def shape_label(shape) -> str:
    return "×".join(str(x) for x in shape)


def label(method: str) -> str:
    return LABELS.get(method, method)


COLUMNS = ["shape", "kind", "T", "method", "fwd+bwd ms", "× loss (memory)", "× verl", "× torch.compile", "peak MiB",
           "TFLOP/s", "% peak", "first call s", "log-prob err", "entropy err", "dE err", "dC err", "notes"]


def table_rows(results: list[dict]) -> list[list[str]]:
    rows = []
    for r in results:
        head = [shape_label(r["shape"]), r["kind"], R.fmt(r.get("temperature"), "g"), label(r["method"])]
        st = R.status(r)
        if "skipped" in r:
            rows.append(head + [""] * (len(COLUMNS) - 5) + [st])
            continue
        notes = []
        if r.get("lp_sign") == "−log p":
            notes.append("returns −log p: log-prob err of its negation; dE/dC errors assume log p")
        pol = r.get("skip_policy") or {}
        if pol.get("kept_fraction") is not None:
            notes.append(f"{100 * pol['kept_fraction']:.0f}% dC tiles kept: {'skips' if pol.get('skips') else 'dense'}")
        if st:
            notes.append(st)
        frac = R.num(r.get("frac_peak"))
        lp_err = R.fmt(R.num(r.get("lp_rel_err")), ".1e")
        if r.get("output") == "loss":
            lp_err = "loss " + R.fmt(R.num(r.get("loss_rel_err")), ".1e")
        tflops = R.num(r.get("tflops"))
        tf = R.fmt(tflops, ".0f" if tflops is None or tflops >= 10 else ".2g")
        rows.append(head + [
            R.fmt(R.num(r.get("fwd_bwd_ms")), ".2f"), R.fmt(r.get("ratio_loss_memory"), ".3f"),
            R.fmt(r.get("ratio_verl"), ".2f"), R.fmt(r.get("ratio_torch_compile"), ".2f"),
            R.fmt(R.num(r.get("fwd_bwd_peak_mb")), ".0f"),
            tf + (f" ({r['flops_count']})" if tf != "–" and r.get("flops_count") else ""),
            R.fmt(None if frac is None else 100 * frac, ".1f"), R.fmt(R.num(r.get("first_call_s")), ".1f"),
            lp_err, R.fmt(R.num(r.get("ent_rel_err")), ".1e"), R.fmt(R.num(r.get("de_rel_err")), ".1e"),
            R.fmt(R.num(r.get("dc_rel_err")), ".1e"), "; ".join(notes)])
    return rows


def summary_rows(results: list[dict]) -> list[list[str]]:
    """One line per (shape, kind, T): ours, the loss, the bar, verl, torch.compile."""
    by = {}
    for r in results:
        by.setdefault((tuple(r["shape"]), r["kind"], r.get("temperature")), {})[r["method"]] = r
    rows = []
    for (shape, kind, temp), ms in by.items():
        ours = ms.get("vpcce_log_probs", {})
        ratio = R.num(ours.get("ratio_loss_memory"))
        verdict = "–" if ratio is None else ("met" if ratio <= BAR else "NOT met")

        def t(name):
            return R.fmt(R.num(ms.get(name, {}).get("fwd_bwd_ms")), ".1f")

        rows.append([shape_label(shape), kind, R.fmt(temp, "g"), t("vpcce_log_probs"), t("vpcce_loss_memory"),
                     R.fmt(ratio, ".3f"), verdict, t("verl"), R.fmt(ours.get("ratio_verl"), ".2f"), t("torch_compile"),
                     R.fmt(ours.get("ratio_torch_compile"), ".2f"), t("eager")])
    return rows


def markdown(doc: dict) -> str:
    from machine import header

    a = doc.get("args", {})
    intro = (f"Forward+backward of per-token log-probs and entropy with the upstream gradient of "
             f"Σ w1·log_prob + Σ w2·entropy (w1, w2 fixed random [N]) w.r.t. e and c; {a.get('dtype')}, "
             f"temperature {a.get('temperature')}, our impl {doc.get('impl')}; median of {a.get('reps')} CUDA-event "
             f"timings (perf_counter on CPU) after {a.get('warmup')} warm-up calls (the first, compiling, one timed alone: first call s), "
             f"one process. Our loss row (the bar's reference) is the mean cross-entropy at T = 1, its backward from "
             f"the loss. × columns: fwd+bwd time over that row's, same shape and inputs. Peak MiB: added during the "
             f"timed calls, inputs excluded, gradients included. TFLOP/s counts 8·N·D·V for the methods that "
             f"recompute the logits in the backward (ours, verl) and 6·N·D·V for the unfused ones; % peak is of an "
             f"8192³ bf16 matmul ({fmt(R.num(doc.get('peak_tflops')), '.0f')} TFLOP/s, {doc.get('peak_source')}). "
             f"Errors ‖x − ref‖/‖ref‖ against float64 over all tokens (the loss row: loss, dE, dC of the mean loss).")
    lines = header(doc, "rl suite", intro)
    lines += R.md_table(COLUMNS, table_rows(doc.get("results", [])))
    inputs = doc.get("inputs", [])
    if inputs:
        lines += ["", "Inputs (float64 over all tokens):", ""]
        lines += R.md_table(["shape", "kind", "T", "mean log-prob", "mean entropy", "loss (T = 1)", "reference s",
                             "error"],
                            [[shape_label(i["shape"]), i["kind"], R.fmt(i.get("temperature"), "g"),
                              R.fmt(R.num(i.get("ref_mean_log_prob")), ".4f"),
                              R.fmt(R.num(i.get("ref_mean_entropy")), ".4f"), R.fmt(R.num(i.get("ref_loss")), ".4f"),
                              R.fmt(R.num(i.get("ref_seconds")), ".1f"), i.get("error") or i.get("ref_error") or ""]
                             for i in inputs])
    notes = sorted({f"{label(r['method'])}: {r['note']}" for r in doc.get("results", []) if r.get("note")})
    if notes:
        lines += ["", "Methods: " + "; ".join(notes) + "."]
    signs = {r.get("lp_sign") for r in doc.get("results", []) if r["method"] == "verl" and r.get("lp_sign")}
    if signs:
        lines += ["", "verl's first output, checked against the float64 reference: "
                  + ", ".join(sorted(signs)) + (" (the same sign as ours)." if signs == {"log p"} else ".")]
    lines += ["", f"Summary (ms; the bar: ours ≤ {BAR}× our loss's memory-first mode):", ""]
    lines += R.md_table(["shape", "kind", "T", "ours", "loss (memory)", "× loss", "bar", "verl", "× verl",
                         "torch.compile", "× compile", "eager"], summary_rows(doc.get("results", [])))
    return "\n".join(lines) + "\n"


def chart(doc: dict, path: str):
    rows = [{"group": shape_label(r["shape"]), "panel": f"{r['kind']}, T = {r.get('temperature', 1.0):g}",
             "method": r["method"], "value": r.get("fwd_bwd_ms"), "mem": r.get("fwd_bwd_peak_mb"),
             "ratio": r.get("ratio_loss_memory"), "status": R.status(r)} for r in doc.get("results", [])]
    m = doc.get("machine", {})
    return charts.bar_chart(rows, path, value_label="forward+backward ms", mem_label="peak MiB added",
                       ratio_label="time / our loss (memory-first)", labels=LABELS,
                       title=f"Log-probs + entropy, {m.get('device_name', 'CPU')} {doc.get('date', '')}".strip())


def merge(docs: list[dict]) -> dict:
    """Several rl documents (e.g. temperatures 1.0 and 0.7) as one; ratios recomputed."""
    out = R.concat_docs(docs, ("inputs", "results"))
    add_ratios(out["results"])
    return out
