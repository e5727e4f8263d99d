import io
import math

import pytest
import torch

from edgetrain import serde
from edgetrain.errors import WireError
from edgetrain.proto import edgetrain_pb2 as pb


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(300, 1000, generator=g),  # 1.2 MB: several parts
        "b": torch.randn(7, generator=g),
        "steps": torch.tensor(42, dtype=torch.int64),
        "empty": torch.zeros(0),
    }


def test_roundtrip_float32_is_exact_and_split_into_parts() -> None:
    state = _state()
    parts = list(serde.encode(state))
    assert all(len(p.data) <= serde.PART_BYTES for p in parts)
    assert [p.name for p in parts].count("w") == math.ceil(300 * 1000 * 4 / serde.PART_BYTES)
    out = serde.decode(parts, serde.spec_of(state))
    for k, v in state.items():
        assert out[k].dtype == v.dtype
        assert torch.equal(out[k], v)


@pytest.mark.parametrize(("wire", "tol"), [("float16", 2e-3), ("bfloat16", 2e-2), ("int8", 0.03)])
def test_compressed_wire_dtypes_decode_close_to_the_original(wire: str, tol: float) -> None:
    state = _state()
    parts = list(serde.encode(state, wire_dtype=wire))
    wire_bytes = sum(len(p.data) for p in parts if p.name == "w")
    assert wire_bytes == 300 * 1000 * (1 if wire == "int8" else 2)
    out = serde.decode(parts, serde.spec_of(state))
    assert out["w"].dtype == torch.float32
    assert float((out["w"] - state["w"]).abs().max()) <= tol * float(state["w"].abs().max())
    assert torch.equal(out["steps"], state["steps"])  # integers never compressed


def _parts(**over: object) -> list[pb.TensorPart]:
    state = {"w": torch.ones(2, 3)}
    parts = list(serde.encode(state))
    for k, v in over.items():
        if k == "shape":
            del parts[0].shape[:]
            parts[0].shape.extend(v)  # type: ignore[arg-type]
        else:
            setattr(parts[0], k, v)
    return parts


EXPECTED = {"w": serde.TensorSpec((2, 3), torch.float32)}


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"name": "v"}, "unexpected tensor"),
        ({"shape": [3, 2]}, "shape"),
        ({"dtype": pb.INT64}, "dtype"),
        ({"dtype": pb.DTYPE_UNSPECIFIED}, "unknown dtype"),
        ({"data": b"\x00" * 20}, "bytes, its shape needs 24"),
        ({"data": b"\x00" * 28}, "more than the 24 bytes"),
        ({"offset": 4}, "offset"),
        ({"data": torch.full((6,), float("nan")).numpy().tobytes()}, "NaN or Inf"),
        ({"data": torch.full((6,), float("inf")).numpy().tobytes()}, "NaN or Inf"),
    ],
)
def test_decoder_refuses_what_does_not_match(over: dict[str, object], message: str) -> None:
    with pytest.raises(WireError, match=message):
        serde.decode(_parts(**over), EXPECTED)


def test_missing_tensor_and_out_of_order_parts_are_refused() -> None:
    state = {"a": torch.ones(serde.PART_BYTES // 4 + 1000), "b": torch.ones(2)}  # a: 2 parts
    parts = list(serde.encode(state))
    with pytest.raises(WireError, match="missing tensors: b"):
        serde.decode(parts[:2], serde.spec_of(state))
    with pytest.raises(WireError, match="bytes, its shape needs"):  # b starts before a is complete
        serde.decode([parts[0], parts[2], parts[1]], serde.spec_of(state))
    with pytest.raises(WireError, match="out of order"):  # a comes back after b
        serde.decode([*parts, parts[1]], serde.spec_of(state))
    with pytest.raises(WireError, match="offset"):
        serde.decode([parts[1], parts[0], parts[2]], serde.spec_of(state))


def test_int8_scale_must_be_positive_and_finite() -> None:
    parts = list(serde.encode({"w": torch.ones(4)}, wire_dtype="int8"))
    parts[0].scale = float("nan")
    with pytest.raises(WireError, match="scale"):
        serde.decode(parts, {"w": serde.TensorSpec((4,), torch.float32)})


def test_a_model_over_20_mb_travels_in_parts_below_the_grpc_cap() -> None:
    state = {"big": torch.arange(6_000_000, dtype=torch.float32)}  # 24 MB
    parts = list(serde.encode(state))
    assert len(parts) == math.ceil(24_000_000 / serde.PART_BYTES)
    assert max(p.ByteSize() for p in parts) < 4 * 1024 * 1024
    assert torch.equal(serde.decode(parts, serde.spec_of(state))["big"], state["big"])


def test_unknown_wire_dtype_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="unknown wire dtype"):
        list(serde.encode({"w": torch.ones(1)}, wire_dtype="float8"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_all_finite_finds_every_nan_and_inf_in_every_float_dtype(dtype: torch.dtype) -> None:
    x = torch.linspace(-100, 100, 50).to(dtype)
    assert serde.all_finite(x) and serde.all_finite(x[::3])  # strided views too
    assert serde.all_finite(torch.tensor([torch.finfo(dtype).max, torch.finfo(dtype).min], dtype=dtype))
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[17] = bad
        assert not serde.all_finite(y), (dtype, bad)
    assert serde.all_finite(torch.arange(5))  # integers have no NaN


@pytest.mark.parametrize("wire", ["float32", "float16", "bfloat16", "int8"])
def test_a_file_decodes_to_what_the_stream_decodes(wire: str) -> None:
    g = torch.Generator().manual_seed(1)
    state = {"w": torch.randn(300, 70, generator=g), "b": torch.randn(7, generator=g), "n": torch.tensor(5),
             "empty": torch.zeros(0, 3)}
    f = io.BytesIO()
    layout = serde.write_raw(state, f, wire_dtype=wire)
    assert all(not p.data and not p.offset for p in layout)
    f.seek(0)
    from_file, nbytes = serde.decode_file(f, layout, serde.spec_of(state))
    streamed = serde.decode(serde.encode(state, wire_dtype=wire), serde.spec_of(state))
    assert nbytes == len(f.getvalue())
    assert {k: v.numpy().tobytes() for k, v in from_file.items()} == {
        k: v.numpy().tobytes() for k, v in streamed.items()}


def test_a_file_layout_entry_with_data_is_refused() -> None:
    state = {"b": torch.ones(4)}
    f = io.BytesIO()
    layout = serde.write_raw(state, f)
    layout[0].data = b"\0" * 16
    f.seek(0)
    with pytest.raises(WireError, match="no data"):
        serde.decode_file(f, layout, serde.spec_of(state))
