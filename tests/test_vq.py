"""VectorQuantizer: EMA codebook in buffers, masked statistics, straight-through, dead codes, DDP sync."""
import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from s2i.vq import VectorQuantizer


def padded(x: torch.Tensor, lengths: list[int], fill: float = 123.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Overwrite everything beyond each length with garbage; return (x, mask)."""
    mask = torch.arange(x.shape[1])[None, :] < torch.tensor(lengths)[:, None]
    return x.masked_fill(~mask[:, :, None], fill), mask


def manual_ema(vq: VectorQuantizer, frames: torch.Tensor) -> torch.Tensor:
    """The codebook after one EMA step on ``frames (N, D)``, computed the long way."""
    K = vq.codebook_size
    codes = torch.cdist(frames, vq.codebook).argmin(1)
    onehot = torch.nn.functional.one_hot(codes, K).float()
    count = vq.decay * vq.ema_count + (1 - vq.decay) * onehot.sum(0)
    total = count.sum()
    count = (count + vq.eps) / (total + K * vq.eps) * total
    ema_sum = vq.decay * vq.ema_sum + (1 - vq.decay) * onehot.t() @ frames
    return ema_sum / count[:, None]


def test_codebook_lives_in_buffers_updated_in_place():
    torch.manual_seed(0)
    vq = VectorQuantizer(4, 8).train()
    assert list(vq.parameters()) == []
    assert {n for n, _ in vq.named_buffers()} == {"codebook", "ema_count", "ema_sum", "initialized"}
    ptr = vq.codebook.data_ptr()
    x = torch.randn(2, 5, 4)
    expected = manual_ema(vq, x.reshape(-1, 4))
    vq(x)
    assert vq.codebook.data_ptr() == ptr and not vq.codebook.requires_grad
    torch.testing.assert_close(vq.codebook, expected)
    before = vq.codebook.clone()
    vq.eval()(x)
    assert torch.equal(vq.codebook, before), "eval mode must not update the codebook"


def test_padded_frames_do_not_enter_statistics():
    torch.manual_seed(0)
    x = torch.randn(3, 7, 4)
    lengths = [7, 3, 5]
    xp, mask = padded(x, lengths)
    a = VectorQuantizer(4, 6).train()
    b = copy.deepcopy(a)
    valid = torch.cat([x[i, :n] for i, n in enumerate(lengths)])
    expected = manual_ema(a, valid)
    out = a(xp, mask)
    torch.testing.assert_close(a.codebook, expected)
    # the same utterances with less padding give the same update and the same outputs
    out_b = b(xp[:, :7], mask[:, :7])
    torch.testing.assert_close(a.codebook, b.codebook)
    assert (out.codes[~mask] == -1).all() and (out.codes[mask] >= 0).all()
    assert (out.quantized[~mask] == 0).all()
    torch.testing.assert_close(out.loss, out_b.loss)


def test_straight_through_gradient_and_commitment_loss():
    torch.manual_seed(0)
    vq = VectorQuantizer(4, 5, commitment_weight=0.25).eval()
    x = torch.randn(2, 6, 4, requires_grad=True)
    xp, mask = padded(x, [6, 2])
    out = vq(xp, mask)
    g = torch.randn_like(out.quantized)
    (out.quantized * g).sum().backward()
    torch.testing.assert_close(x.grad, g * mask[:, :, None])  # identity on valid frames, nothing from padding
    valid = x.detach()[mask]
    q = vq.codebook[torch.cdist(valid, vq.codebook).argmin(1)]
    torch.testing.assert_close(out.loss, 0.25 * (valid - q).pow(2).mean())
    torch.testing.assert_close(out.quantized.detach()[mask], q)
    x.grad = None
    vq(padded(x, [6, 2])[0], mask).loss.backward()
    torch.testing.assert_close(x.grad[mask], 0.25 * 2 * (valid - q) / valid.numel())


def test_perplexity_and_usage():
    vq = VectorQuantizer(2, 4).eval()
    vq.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]]))
    x = torch.tensor([[[0.1, 0.0], [9.9, 0.2], [0.0, 9.0], [10.0, 0.1]]])  # codes 0, 1, 2, 1
    out = vq(x)
    assert out.codes.tolist() == [[0, 1, 2, 1]]
    p = torch.tensor([0.25, 0.5, 0.25])
    torch.testing.assert_close(out.perplexity, torch.exp(-(p * p.log()).sum()))
    assert float(out.usage) == 0.75


def test_dead_codes_move_onto_batch_frames():
    torch.manual_seed(0)
    vq = VectorQuantizer(3, 8, dead_code_threshold=0.5).train()
    vq.codebook.copy_(torch.full((8, 3), 50.0))
    vq.codebook[0] = 0.0
    vq.ema_sum.copy_(vq.codebook)
    vq.ema_count.fill_(0.4)  # every code below the threshold
    vq.ema_count[0] = 100.0
    x = torch.randn(2, 10, 3)
    xp, mask = padded(x, [10, 4], fill=-1000.0)
    vq(xp, mask)
    valid = x[mask]
    for k in range(1, 8):  # re-initialised onto a valid frame (never the padding)
        assert torch.cdist(vq.codebook[k:k + 1], valid).min() < 1e-5
    assert (vq.ema_count[1:] >= 0.5).all()


def test_kmeans_init_on_first_training_batch():
    torch.manual_seed(0)
    centres = torch.tensor([[5.0, 5.0], [-5.0, 5.0], [5.0, -5.0]])
    x = (centres[torch.randint(3, (200,))] + 0.1 * torch.randn(200, 2))[None]
    vq = VectorQuantizer(2, 3, kmeans_init=True)
    assert not bool(vq.initialized)
    vq.eval()(x)
    assert not bool(vq.initialized), "eval mode must not initialise from data"
    vq.train()(x)
    assert bool(vq.initialized)
    nearest = torch.cdist(centres, vq.codebook).min(1).values
    assert (nearest < 0.2).all()


def test_jitter_only_in_training_and_within_the_utterance():
    torch.manual_seed(0)
    vq = VectorQuantizer(2, 16, jitter=1.0)
    x = torch.randn(2, 9, 2)
    xp, mask = padded(x, [9, 5])
    plain = vq.eval()(xp, mask)
    torch.testing.assert_close(plain.quantized[mask], vq.codebook[plain.codes[mask]])
    vq.decay = 1.0  # keep the codebook fixed so outputs can be compared
    out = vq.train()(xp, mask)
    assert (out.quantized[~mask] == 0).all()
    q = plain.quantized
    for b, n in enumerate([9, 5]):
        for t in range(n):
            options = [q[b, max(t - 1, 0)], q[b, min(t + 1, n - 1)]]
            assert any(torch.allclose(out.quantized[b, t], o) for o in options)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


START = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [2.0, 2.0, 2.0], [50.0, 50.0, 50.0]])  # code 3: unused


def _ddp_worker(rank: int, port: int, frames: torch.Tensor, result: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(rank)  # different RNG streams: dead-code picks must still agree
    vq = VectorQuantizer(3, 4, dead_code_threshold=0.995)  # unused codes (count 0.99) are dead
    vq.codebook.copy_(START)
    vq.ema_sum.copy_(vq.codebook)
    vq.train()(frames[rank][None])
    result[rank] = vq.codebook.clone()
    dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_ddp_replicas_keep_identical_codebooks():
    torch.manual_seed(0)
    frames = torch.randn(2, 6, 3)
    frames[1] += 2.0
    with mp.Manager() as manager:
        result = manager.dict()
        mp.start_processes(_ddp_worker, args=(_free_port(), frames, result), nprocs=2, start_method="fork")
        a, b = result[0], result[1]
    torch.testing.assert_close(a, b)
    single = VectorQuantizer(3, 4)
    single.codebook.copy_(START)
    single.ema_sum.copy_(single.codebook)
    expected = manual_ema(single, frames.reshape(-1, 3))  # the update on both replicas' frames together
    alive = torch.tensor([(torch.cdist(frames.reshape(-1, 3), single.codebook).argmin(1) == k).any() for k in range(4)])
    torch.testing.assert_close(a[alive], expected[alive])
    assert not alive.all(), "the test should exercise dead-code re-initialisation"
    for k in torch.nonzero(~alive).flatten():  # re-initialised onto a frame of rank 0, on both replicas
        assert torch.cdist(a[k:k + 1], frames[0]).min() < 1e-5
