"""Bad latent input: each case gets its own clear error, before any decode, and writes nothing."""

import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from actors.protocol import InputError, RenderSpec
from actors.worker import check_fits
from cluster.latents import read_latents, validate_latents
from cluster.driver import RenderJob, latents_digest

Z = 16


def _good(t=3):
    return torch.randn(Z, t, 4, 6)


@pytest.mark.parametrize("shape", [(Z, 3, 4, 6), (1, Z, 3, 4, 6)])
def test_good_shapes_and_formats_read_back(tmp_path, shape):
    x = torch.randn(shape)
    save_file({"latents": x}, tmp_path / "a.safetensors")
    save_file({"whatever": x}, tmp_path / "b.safetensors")
    np.save(tmp_path / "c.npy", x.numpy())
    torch.save(x, tmp_path / "d.pt")
    torch.save({"latents": x}, tmp_path / "e.pt")
    for name in "a.safetensors b.safetensors c.npy d.pt e.pt".split():
        got = validate_latents(read_latents(str(tmp_path / name)), Z)
        assert got.shape == (Z, 3, 4, 6)
        torch.testing.assert_close(got, x.reshape(Z, 3, 4, 6), rtol=0, atol=0)


@pytest.mark.parametrize("tensor, message", [
    (torch.randn(Z, 3, 4), "rank 3"),
    (torch.randn(2, Z, 3, 4, 6), "batch of 2"),
    (torch.randn(8, 3, 4, 6), "8 channels, but the decoder expects 16"),
    (torch.randn(Z, 0, 4, 6), "T = 0"),
    (torch.full((Z, 2, 4, 6), float("nan")), "non-finite"),
    (torch.ones(Z, 2, 4, 6).index_fill_(0, torch.tensor([3]), float("inf")), "non-finite"),
    (torch.ones(Z, 2, 4, 6, dtype=torch.int32), "not floating point"),
])
def test_each_bad_tensor_has_its_own_error(tensor, message):
    with pytest.raises(InputError, match=message):
        validate_latents(tensor, Z)


def test_finite_values_too_large_to_sum_are_accepted_and_one_inf_among_them_is_not():
    # The check sums the latents first; a sum that overflows must not pass for a NaN.
    big = torch.full((Z, 3, 4, 6), 3e38)
    assert validate_latents(big, Z) is big
    big[5, 1, 2, 3] = float("-inf")
    with pytest.raises(InputError, match="1 non-finite values"):
        validate_latents(big, Z)
    half = torch.full((Z, 3, 4, 6), 60000.0, dtype=torch.float16)  # its sum in fp16 would overflow
    assert validate_latents(half, Z) is half


def test_values_beyond_the_decoders_dtype_are_refused():
    # fp64 values beyond fp32's range are finite as given but inf in an fp32 decoder (Wan
    # then writes black frames); fp32 values beyond bf16's largest are inf in a bf16 one.
    wide = torch.ones(Z, 3, 4, 6, dtype=torch.float64)
    wide[2, 1, 0, 0], wide[3, 2, 1, 1] = 1e300, -1e39
    with pytest.raises(InputError, match="2 non-finite values in the decoder's float32"):
        validate_latents(wide, Z, dtype=torch.float32)
    assert validate_latents(torch.full((Z, 2, 4, 6), 1e30, dtype=torch.float64), Z) is not None
    near = torch.ones(Z, 2, 4, 6)
    near[0, 0, 0, 0] = 3.4e38  # finite in fp32, not in bf16
    assert validate_latents(near, Z, dtype=torch.float32) is near
    with pytest.raises(InputError, match="1 non-finite values in the decoder's bfloat16"):
        validate_latents(near, Z, dtype=torch.bfloat16)
    nan64 = torch.ones(Z, 2, 4, 6, dtype=torch.float64)
    nan64[1, 1, 1, 1] = float("nan")
    with pytest.raises(InputError, match="1 non-finite values"):
        validate_latents(nan64, Z)


def test_latents_digest_sees_every_value_shape_and_dtype():
    x = torch.randn(Z, 3, 64, 64 * 100)  # 75 MiB: several of the digest's chunks
    d = latents_digest(x)
    assert latents_digest(x.clone()) == d
    y = x.clone()
    y[Z - 1, 2, 63, -1] += 1.0  # the last value, in the last chunk
    assert latents_digest(y) != d
    y = x.clone()
    y[0, 0, 0, 0] = -y[0, 0, 0, 0]
    assert latents_digest(y) != d
    assert latents_digest(x.reshape(Z, 3, 128, -1)) != d
    assert latents_digest(x.view(torch.int32)) != d
    assert latents_digest(x[:, :, :, ::2]) == latents_digest(x[:, :, :, ::2].contiguous())


def test_unreadable_and_truncated_files(tmp_path):
    save_file({"latents": _good()}, tmp_path / "x.safetensors")
    data = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cannot read latents"):
        read_latents(str(tmp_path / "cut.safetensors"))
    np.save(tmp_path / "x.npy", _good().numpy())
    (tmp_path / "cut.npy").write_bytes((tmp_path / "x.npy").read_bytes()[:100])
    with pytest.raises(InputError, match="cannot read latents"):
        read_latents(str(tmp_path / "cut.npy"))
    with pytest.raises(InputError, match="no such latents file"):
        read_latents(str(tmp_path / "missing.safetensors"))
    with pytest.raises(InputError, match="unsupported latents format"):
        read_latents(str(tmp_path / "x.txt"))
    save_file({"a": _good(), "b": _good()}, tmp_path / "two.safetensors")
    with pytest.raises(InputError, match="none is named 'latents'"):
        read_latents(str(tmp_path / "two.safetensors"))


def test_pickles_are_never_loaded(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    import pickle

    (tmp_path / "evil.pt").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(InputError):
        read_latents(str(tmp_path / "evil.pt"))
    np.save(tmp_path / "obj.npy", np.array([Evil()], dtype=object), allow_pickle=True)
    with pytest.raises(InputError):
        read_latents(str(tmp_path / "obj.npy"))
    assert not (tmp_path / "pwned").exists()


def test_frame_too_large_for_the_device():
    with pytest.raises(InputError, match="7680x4320 needs about"):
        check_fits(200 * 2**30, 96 * 2**30, 4320, 7680, "NVIDIA RTX PRO 6000")
    check_fits(10 * 2**30, 96 * 2**30, 720, 1280, "NVIDIA RTX PRO 6000")
    # The allocator reserves about half as much again as the peak, and the weights come on top.
    with pytest.raises(InputError, match="70.0 GiB peak"):
        check_fits(70 * 2**30, 96 * 2**30, 2304, 4096, "NVIDIA RTX PRO 6000")
    check_fits(60 * 2**30, 96 * 2**30, 2304, 4096, "NVIDIA RTX PRO 6000", weights_bytes=2**30)


@pytest.mark.parametrize("tensor", [torch.randn(Z, 3, 4), torch.randn(8, 3, 30, 40)])
def test_rejected_input_writes_nothing(tmp_path, tensor):
    out = tmp_path / "out"
    spec = RenderSpec(output=str(out), decoder={"name": "test-pattern"})
    # Validation runs before Ray is touched: no cluster is needed to reject input.
    with pytest.raises(InputError):
        RenderJob(spec, tensor).run()
    assert not out.exists()
