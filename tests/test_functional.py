"""divrl.rewards.functional against hand-worked cases and a brute-force float64 reference."""

import itertools
import math

import numpy as np
import pytest
import torch

from divrl.rewards.functional import gated_reward, linear_reward, masked_pearson, nssm, vsm


def grid(tokens, h, w):
    """(N, C) list of token vectors (row-major) -> (1, C, h, w) grid."""
    t = torch.tensor(tokens, dtype=torch.float32)
    return t.T.reshape(1, -1, h, w)


# ------------------------------------------------------------------------------------------ brute-force references


def brute_nssm(gen, ref, mask, pool):
    """Loop-by-loop nSSM in float64 numpy for one generated and one reference (C, H, W) grid."""

    def tokens(x):
        x = x.astype(np.float64)
        c, h, w = x.shape
        out = []
        for i in range(0, h, pool):
            for j in range(0, w, pool):
                acc = np.zeros(c)
                for di in range(pool):
                    for dj in range(pool):
                        v = x[:, i + di, j + dj]
                        n = np.linalg.norm(v)
                        acc += v / n if n > 0 else v
                out.append(acc / pool**2)
        return out

    tg, tr = tokens(gen), tokens(ref)
    n = len(tg)
    inside = [True] * n if mask is None else list(mask.flatten())
    a, b = [], []
    for i in range(n):
        for j in range(n):
            if i != j and inside[i] and inside[j]:
                a.append(tr[i] @ tr[j])
                b.append(tg[i] @ tg[j])
    return 1.0 - np.corrcoef(a, b)[0, 1]


def brute_vsm(gs, gv, rs, rv, gmask, rmask, tau_s, tau_v):
    """Loop-by-loop VSM in float64 for one image: cosine argmax, semantic gate, one-to-one, visual fraction."""

    def cells(x):
        c = x.shape[0]
        return [v / np.linalg.norm(v) for v in x.reshape(c, -1).T.astype(np.float64)]

    gs, gv, rs, rv = cells(gs), cells(gv), cells(rs), cells(rv)
    n = len(gs)
    gin = [True] * n if gmask is None else list(gmask.flatten())
    rin = [j for j in range(n) if (True if rmask is None else rmask.flatten()[j])]
    cand = {}
    for i in range(n):
        if not gin[i] or not rin:
            continue
        sem = [gs[i] @ rs[j] for j in rin]
        best = int(np.argmax(sem))
        vis = max(gv[i] @ rv[j] for j in rin)
        if sem[best] > tau_s:
            cand.setdefault(rin[best], []).append((sem[best], i, vis))
    kept = [max(c, key=lambda t: (t[0], -t[1])) for c in cand.values()]
    if not kept:
        return 0.0
    return sum(v > tau_v for _, _, v in kept) / len(kept)


# ------------------------------------------------------------------------------------------------------- nSSM


def test_nssm_hand_worked_2x2():
    # Reference tokens: two of kind A, two of kind B (row-major 2x2); scaled to show the normalisation.
    ref = grid([[3, 0], [1, 0], [0, 2], [0, 5]], 2, 2)
    gen = grid([[1, 0], [0, 4], [2, 0], [0, 1]], 2, 2)
    # Off-diagonal unique pairs (01, 02, 03, 12, 13, 23): ref SSM [1,0,0,0,0,1], gen SSM [0,1,0,0,1,0].
    # Means 1/3; cov = 6 * ... = -2/3 / 6; var = 4/3 / 6 each -> rho = -1/2 -> nSSM = 3/2.
    assert nssm(gen, ref, pool=1).item() == pytest.approx(1.5, abs=1e-6)
    # With the mask {0, 1, 3}: pairs 01, 03, 13 -> a = [1, 0, 0], b = [0, 0, 1] -> rho = -1/2.
    mask = torch.tensor([[[1, 1], [0, 1]]], dtype=torch.bool)
    assert nssm(gen, ref, mask, pool=1).item() == pytest.approx(1.5, abs=1e-6)
    # Mask {0, 2, 3}: a = [0, 0, 1], b = [1, 0, 0]; same shape of numbers, rho = -1/2 again; and the
    # generated grid equal to the reference gives nSSM = 0.
    assert nssm(ref, ref, mask, pool=1).item() == pytest.approx(0.0, abs=1e-6)


def test_nssm_hand_worked_pooling_without_renormalisation():
    # 4x2 grid pooled 2x2 -> 2x1 tokens; only one pair, so use 4x4 -> 2x2 tokens.
    # Each 2x2 block of the reference mixes e1 and e2 in known proportions; pooled (not re-normalised)
    # tokens: t0 = (1, 0), t1 = (.5, .5), t2 = (.5, .5), t3 = (0, 1).
    e1, e2 = [1.0, 0.0], [0.0, 1.0]
    blocks = {0: [e1] * 4, 1: [e1, e2, e1, e2], 2: [e2, e1, e2, e1], 3: [e2] * 4}
    x = torch.zeros(1, 2, 4, 4)
    for b, vecs in blocks.items():
        bi, bj = divmod(b, 2)
        for k, v in enumerate(vecs):
            di, dj = divmod(k, 2)
            x[0, :, 2 * bi + di, 2 * bj + dj] = torch.tensor(v)
    # Pooled SSM pairs (01, 02, 03, 12, 13, 23) = [.5, .5, 0, .5, .5, .5]. Re-normalised it would be
    # [.707, .707, 0, 1, .707, .707]. Generated: the plain 2x2 pattern e1, e1, e2, e2 blown up to 4x4.
    g = torch.tensor([e1, e1, e2, e2]).T.reshape(1, 2, 2, 2).repeat_interleave(2, 2).repeat_interleave(2, 3)
    a = np.array([0.5, 0.5, 0.0, 0.5, 0.5, 0.5])
    b = np.array([1.0, 0.0, 0.0, 0.0, 0.0, 1.0])
    expected = 1 - np.corrcoef(a, b)[0, 1]  # = 1 - (1/6)/sqrt(5/24 * 4/9 * ...) computed exactly below
    ac, bc = a - a.mean(), b - b.mean()
    assert expected == pytest.approx(1 - (ac @ bc) / math.sqrt((ac @ ac) * (bc @ bc)))
    assert nssm(g, x, pool=2).item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("pool", [1, 2, 3])
@pytest.mark.parametrize("use_mask", [False, True])
def test_nssm_matches_brute_force(pool, use_mask):
    torch.manual_seed(pool)
    gen = torch.randn(3, 5, 6, 6)
    ref = torch.randn(1, 5, 6, 6)
    s = 6 // pool
    mask = (torch.rand(1, s, s) > 0.4) if use_mask else None
    got = nssm(gen, ref, mask, pool=pool)
    for k in range(3):
        m = None if mask is None else mask[0].numpy()
        assert got[k].item() == pytest.approx(brute_nssm(gen[k].numpy(), ref[0].numpy(), m, pool), abs=1e-5)


def test_nssm_self_is_zero_and_range():
    torch.manual_seed(0)
    x = torch.randn(4, 8, 12, 12)
    assert torch.allclose(nssm(x, x), torch.zeros(4), atol=1e-5)
    y = torch.randn(4, 8, 12, 12)
    out = nssm(y, x)
    assert ((out >= 0) & (out <= 2)).all()
    assert (out > 0.5).all()  # independent random grids are structurally unrelated (rho near 0)


def test_nssm_is_invariant_to_per_cell_scale_and_uses_structure():
    torch.manual_seed(1)
    ref = torch.randn(1, 6, 8, 8)
    scaled = ref * torch.rand(1, 1, 8, 8).add(0.1)  # per-cell positive scaling: normalisation removes it
    assert nssm(scaled, ref, pool=1).item() == pytest.approx(0.0, abs=1e-5)
    shifted = torch.roll(ref, shifts=3, dims=3)  # same content, different layout -> positive nSSM
    assert nssm(shifted, ref, pool=1).item() > 0.3


def test_nssm_broadcast_and_batched_masks_agree_with_per_image_calls():
    torch.manual_seed(2)
    gen = torch.randn(4, 3, 8, 8)
    ref = torch.randn(1, 3, 8, 8)
    masks = torch.rand(4, 8, 8) > 0.3
    batched = nssm(gen, ref.expand(4, -1, -1, -1), masks, pool=2)
    for k in range(4):
        assert batched[k].item() == pytest.approx(nssm(gen[k : k + 1], ref, masks[k : k + 1], pool=2).item(), abs=1e-6)


def test_nssm_mask_at_higher_resolution_is_area_averaged():
    torch.manual_seed(3)
    gen, ref = torch.randn(2, 4, 8, 8), torch.randn(1, 4, 8, 8)
    coarse = torch.rand(1, 4, 4) > 0.5
    fine = coarse.repeat_interleave(8, 1).repeat_interleave(8, 2).float()  # 32x32 = 8x the pooled 4x4 grid
    assert torch.allclose(nssm(gen, ref, fine, pool=2), nssm(gen, ref, coarse, pool=2), atol=1e-6)
    # a cell three-quarters covered is inside; a quarter covered is outside
    partial = torch.zeros(1, 8, 8)
    partial[0, :2, :2] = 1.0
    partial[0, 0, 0] = 0.0  # 3/4 of the first pooled cell
    partial[0, 2, 2] = 1.0  # 1/4 of cell (1, 1)
    partial[0, :2, 4:6] = 1.0
    expected_mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    expected_mask[0, 0, 0] = expected_mask[0, 0, 2] = True
    assert torch.allclose(nssm(gen, ref, partial, pool=2), nssm(gen, ref, expected_mask, pool=2), atol=1e-6)
    with pytest.raises(ValueError, match="ref_mask of size 10x10"):
        nssm(gen, ref, torch.ones(1, 10, 10), pool=2)


def test_nssm_degenerate_cases_are_defined():
    torch.manual_seed(4)
    flat = torch.ones(2, 3, 8, 8)
    structured = torch.randn(2, 3, 8, 8)
    assert torch.equal(nssm(flat, flat), torch.zeros(2))  # both flat: identical structure
    assert torch.allclose(nssm(flat, structured[:1]), torch.ones(2))  # one flat: unrelated
    assert torch.allclose(nssm(structured, flat[:1]), torch.ones(2))
    zeros = torch.zeros(2, 3, 8, 8)  # all-zero features: no NaN from the normalisation
    assert torch.isfinite(nssm(zeros, structured[:1])).all()
    empty = torch.zeros(1, 4, 4, dtype=torch.bool)
    single = empty.clone()
    single[0, 1, 1] = True
    assert torch.equal(nssm(structured, structured[:1], empty), torch.zeros(2))
    assert torch.equal(nssm(structured, structured[:1], single), torch.zeros(2))


def test_nssm_bf16_inputs_accumulate_in_fp32():
    torch.manual_seed(5)
    gen, ref = torch.randn(2, 64, 16, 16), torch.randn(1, 64, 16, 16)
    out = nssm(gen.bfloat16(), ref.bfloat16())
    assert out.dtype == torch.float32
    reference = nssm(gen.bfloat16().float(), ref.bfloat16().float())  # same inputs, fp32 all the way
    assert torch.allclose(out, reference, atol=1e-6)


def test_nssm_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"pool=2 does not divide the backbone.s 5x5 feature grid.*\(1, 5\)"):
        nssm(torch.randn(1, 3, 5, 5), torch.randn(1, 3, 5, 5))
    with pytest.raises(ValueError, match="same channels and grid"):
        nssm(torch.randn(1, 3, 8, 8), torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match="batch 2"):
        nssm(torch.randn(3, 3, 8, 8), torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        nssm(torch.randn(3, 8, 8), torch.randn(3, 8, 8))


def test_masked_pearson_matches_numpy():
    torch.manual_seed(6)
    a, b = torch.randn(1, 30), torch.randn(3, 30)
    w = torch.rand(3, 30) > 0.3
    got = masked_pearson(a, b, w)
    for k in range(3):
        m = w[k].numpy()
        assert got[k].item() == pytest.approx(np.corrcoef(a[0].numpy()[m], b[k].numpy()[m])[0, 1], abs=1e-6)


# -------------------------------------------------------------------------------------------------------- VSM


def test_vsm_hand_worked():
    # 1x3 grids, 2-D features. Reference cells: r0 = e1, r1 = e2, r2 = (e1 + e2)/sqrt 2.
    ref = grid([[1, 0], [0, 1], [1, 1]], 1, 3)
    # Generated: g0 = e1 (sem 1.0 -> r0), g1 = (cos 20°, sin 20°) (sem .94 -> r0 as well, loses one-to-one),
    # g2 = (-1, 0) (best cosine 0 -> below tau_s, dropped).
    c, s = math.cos(math.radians(20)), math.sin(math.radians(20))
    gen_sem = grid([[1, 0], [c, s], [-1, 0]], 1, 3)
    # Visual features: g0 matches nothing visually (best cosine .2 < .7).
    gen_vis = grid([[-1, 0.2], [1, 0], [1, 0]], 1, 3)
    ref_vis = grid([[0, 1], [0, 1], [0, 1]], 1, 3)
    # kept = {g0}; its visual best = cos(g0_vis, e2) = 0.2/|(-1,.2)| = .196 < .7 -> VSM = 0/1 = 0.
    assert vsm(gen_sem, gen_vis, ref, ref_vis).item() == 0.0
    # Swap g0/g1 roles by raising g1 above g0: g1 = e1 exactly -> tie at 1.0 with g0; the lowest index wins.
    gen_sem2 = grid([[1, 0], [1, 0], [-1, 0]], 1, 3)
    ref_vis2 = grid([[0, 1], [1, 0], [0, 1]], 1, 3)
    # g0 kept (tie broken by index); g0 visual best over ref_vis2 = max(.196, -.98, .196) -> inconsistent -> 0.
    assert vsm(gen_sem2, gen_vis, ref, ref_vis2).item() == 0.0
    # Drop the visual decoy: gen_vis g0 = e1 -> best visual 1.0 against r1's visual e1 -> VSM = 1/1.
    gen_vis3 = grid([[1, 0], [1, 0], [1, 0]], 1, 3)
    assert vsm(gen_sem2, gen_vis3, ref, ref_vis2).item() == 1.0
    # Loosen tau_s below cos(135°) is impossible for cosine; instead keep all three with distinct targets:
    gen_sem4 = grid([[1, 0], [0, 1], [1, 1]], 1, 3)  # each maps to its own reference cell
    gen_vis4 = grid([[1, 0], [0, 1], [-1, 0]], 1, 3)  # g2's visual best = max(0, -1, 0) = 0 -> inconsistent
    assert vsm(gen_sem4, gen_vis4, ref, ref_vis2).item() == pytest.approx(2 / 3)


def test_vsm_self_is_one_and_no_match_is_zero():
    torch.manual_seed(7)
    x = torch.randn(3, 16, 6, 6)
    assert torch.equal(vsm(x, x, x, x), torch.ones(3))
    far = -x.mean(dim=(2, 3), keepdim=True).expand_as(x).contiguous()  # nothing passes tau_s
    assert torch.equal(vsm(-x, -x, x, x, tau_s=0.99), torch.zeros(3))
    assert torch.isfinite(vsm(far, far, x, x)).all()


def test_vsm_masks_and_empty_masks():
    torch.manual_seed(8)
    x = torch.randn(2, 8, 4, 4)
    empty = torch.zeros(1, 4, 4, dtype=torch.bool)
    assert torch.equal(vsm(x, x, x, x, ref_mask=empty), torch.zeros(2))
    assert torch.equal(vsm(x, x, x, x, gen_mask=empty), torch.zeros(2))
    half = torch.zeros(2, 4, 4, dtype=torch.bool)
    half[:, :2] = True
    assert torch.equal(vsm(x, x, x, x, gen_mask=half, ref_mask=half), torch.ones(2))
    # a 16x16 mask area-averages onto the 4x4 grid
    fine = half.repeat_interleave(4, 1).repeat_interleave(4, 2)
    y = torch.randn(2, 8, 4, 4)
    assert torch.equal(vsm(y, y, x, x, ref_mask=fine, gen_mask=fine), vsm(y, y, x, x, ref_mask=half, gen_mask=half))


@pytest.mark.parametrize("seed", range(4))
def test_vsm_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    ref_s = torch.randn(1, 6, 5, 5, generator=g)
    ref_v = torch.randn(1, 4, 5, 5, generator=g)
    # generated cells are noisy copies of random reference cells, so many pass the thresholds and collide
    idx = torch.randint(0, 25, (3, 25), generator=g)
    gen_s = ref_s.flatten(2)[0][:, idx].permute(1, 0, 2).reshape(3, 6, 5, 5) + 0.6 * torch.randn(
        3, 6, 5, 5, generator=g
    )
    gen_v = ref_v.flatten(2)[0][:, idx].permute(1, 0, 2).reshape(3, 4, 5, 5) + 0.6 * torch.randn(
        3, 4, 5, 5, generator=g
    )
    gmask = torch.rand(3, 5, 5, generator=g) > 0.2
    rmask = torch.rand(1, 5, 5, generator=g) > 0.2
    got = vsm(gen_s, gen_v, ref_s, ref_v, gmask, rmask, tau_s=0.5, tau_v=0.6)
    assert got.sum() > 0  # the case is non-trivial
    for k in range(3):
        expected = brute_vsm(
            gen_s[k].numpy(),
            gen_v[k].numpy(),
            ref_s[0].numpy(),
            ref_v[0].numpy(),
            gmask[k].numpy(),
            rmask[0].numpy(),
            0.5,
            0.6,
        )
        assert got[k].item() == pytest.approx(expected, abs=1e-6)


def test_vsm_bf16_and_shared_features():
    torch.manual_seed(9)
    ref = torch.randn(1, 32, 8, 8)
    gen = ref + 0.5 * torch.randn(4, 32, 8, 8)
    shared = vsm(gen, gen, ref, ref)  # the DINOv2 path: one similarity matrix
    separate = vsm(gen, gen.clone(), ref, ref.clone())
    assert torch.equal(shared, separate)
    low = vsm(gen.bfloat16(), gen.bfloat16(), ref.bfloat16(), ref.bfloat16())
    assert low.dtype == torch.float32
    assert torch.allclose(low, vsm(*(t.bfloat16().float() for t in (gen, gen, ref, ref))))


# ---------------------------------------------------------------------------------------------------- rewards


def test_gated_reward_below_at_and_above_threshold():
    n = torch.tensor([0.8, 0.8, 0.8, 0.3])
    v = torch.tensor([0.2, 0.5, 0.9, 0.0])
    out = gated_reward(n, v, threshold=0.5, weight=5.0)
    expected = torch.tensor([0.8 - 5 * 0.3**2, 0.8, 0.8, 0.3 - 5 * 0.25])
    assert torch.allclose(out, expected)
    assert gated_reward(torch.tensor([1.0]), torch.tensor([0.0]), threshold=0.6, weight=2.0).item() == pytest.approx(
        1 - 2 * 0.36
    )


def test_gated_reward_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        gated_reward(torch.tensor([0.5]), torch.tensor([float("nan")]))


def test_linear_reward():
    n, v = torch.tensor([0.2, 1.0]), torch.tensor([0.6, 0.0])
    assert torch.allclose(linear_reward(n, v, 0.25), torch.tensor([0.25 * 0.6 + 0.75 * 0.2, 0.75]))
    assert torch.equal(linear_reward(n, v, 1.0), v)
    assert torch.equal(linear_reward(n, v, 0.0), n)


def test_no_python_loop_cost_scales_with_batch():
    # Sanity of the batched path on a realistic group: G = 21 images on 48x48 grids in one call.
    torch.manual_seed(10)
    ref = torch.randn(1, 16, 48, 48)
    gen = ref + torch.randn(21, 16, 48, 48)
    out = nssm(gen, ref)
    assert out.shape == (21,) and torch.isfinite(out).all()
    single = torch.stack([nssm(gen[k : k + 1], ref)[0] for k in itertools.islice(range(21), 0, 21, 10)])
    assert torch.allclose(out[::10], single, atol=1e-6)


def test_vsm_per_image_reference_masks_match_single_calls():
    torch.manual_seed(11)
    ref = torch.randn(1, 8, 6, 6)
    gen = ref + 0.7 * torch.randn(3, 8, 6, 6)
    ref_masks = torch.rand(3, 6, 6) > 0.3
    batched = vsm(gen, gen, ref, ref, ref_mask=ref_masks, tau_s=0.5, tau_v=0.6)
    batched_refs = vsm(
        gen, gen, ref.expand(3, -1, -1, -1), ref.expand(3, -1, -1, -1), ref_mask=ref_masks[:1], tau_s=0.5, tau_v=0.6
    )
    for k in range(3):
        single = vsm(gen[k : k + 1], gen[k : k + 1], ref, ref, ref_mask=ref_masks[k : k + 1], tau_s=0.5, tau_v=0.6)
        expected = brute_vsm(
            gen[k].numpy(), gen[k].numpy(), ref[0].numpy(), ref[0].numpy(), None, ref_masks[k].numpy(), 0.5, 0.6
        )
        assert batched[k].item() == pytest.approx(single.item()) == pytest.approx(expected)
        expected0 = brute_vsm(
            gen[k].numpy(), gen[k].numpy(), ref[0].numpy(), ref[0].numpy(), None, ref_masks[0].numpy(), 0.5, 0.6
        )
        assert batched_refs[k].item() == pytest.approx(expected0)
