"""An unreachable store is not a pile of bad images: reads retry, then the stage fails loudly.

Before: a read against a dead S3 endpoint failed after ~2 s with an ``OSError`` that the training stream
treated as a bad image (another image was swapped in, counted nowhere) and that curation recorded as an
``unreadable`` skip outside the skip vocabulary, never retried. A missing file, on the other hand, is a fact
about the data: a counted ``missing`` skip.
"""

from __future__ import annotations

import io
import socket
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dino_ray import storage
from dino_ray.data.decode import SKIP_REASONS, DecodeConfig

FAST = storage.Retry(attempts=2, backoff_s=0.05)


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((24, 24, 3), 90, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def dead_s3(monkeypatch):
    """An S3 endpoint on a loopback port nobody listens on, and short retries for the test."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setattr(storage, "READ_RETRY", FAST)
    return "s3://nobody-home"


def _crop_maker(tmp_path, uris):
    from dino_ray.data.crop_config import MultiCropConfig
    from dino_ray.data.masking import MaskingConfig
    from dino_ray.data.ssl_stream import CropMaker, StreamSpec

    pq.write_table(pa.table({"uri": uris}), tmp_path / "index.parquet")

    class DataCfg:  # the three sections CropMaker reads from a stage's data config
        decode, masking = DecodeConfig(), MaskingConfig()
        crops = MultiCropConfig(global_crops_size=16, local_crops_number=0, patch_size=4)

    spec = StreamSpec(index_uri=str(tmp_path / "index.parquet"), n_images=len(uris), seed=0, batch_size=len(uris),
                      world_size=1, rank=0, start_step=0, total_steps=1)
    return CropMaker(spec, DataCfg)


def _feature_maker():
    from dino_ray.stages.inference import FeatureMaker, InferenceSpec

    return FeatureMaker(InferenceSpec(backbone=None, image_size=16, mode="pixels", decode=DecodeConfig(),
                                      pixel_size=8))


def test_a_dead_store_is_retried_then_raises_storage_error(dead_s3, caplog):
    with pytest.raises(storage.StorageError, match="failed 2 times"):
        storage.read_bytes(f"{dead_s3}/a.jpg")
    assert "attempt 1 of 2" in caplog.text  # the retry is said, not silent
    assert not issubclass(storage.StorageError, OSError)  # decoders' `except OSError` cannot swallow it


def test_the_training_stream_fails_instead_of_swapping_images(dead_s3, tmp_path):
    maker = _crop_maker(tmp_path, [f"{dead_s3}/{i}.png" for i in range(4)])
    with pytest.raises(storage.StorageError):
        maker({"id": np.arange(4)})


def test_curation_inference_fails_instead_of_recording_bad_images(dead_s3):
    uris = np.array([f"{dead_s3}/{i}.png" for i in range(3)], dtype=object)
    with pytest.raises(storage.StorageError):
        _feature_maker()({"id": uris, "uri": uris, "label": np.zeros(3, np.int64)})


def test_a_missing_file_is_a_counted_skip_in_both_streams(tmp_path):
    png = _png()
    uris = []
    for i in range(6):
        (tmp_path / f"{i}.png").write_bytes(png)
        uris.append(str(tmp_path / f"{i}.png"))
    uris.insert(2, str(tmp_path / "gone.png"))  # listed, then deleted before training read it

    out = _crop_maker(tmp_path, uris)({"id": np.arange(len(uris))})
    assert out["global_0"].shape[0] == len(uris)  # every position still got an image
    assert out["skips"][:, SKIP_REASONS.index("missing")].sum() >= 1
    assert out["skips"].sum() == out["skips"][:, SKIP_REASONS.index("missing")].sum()

    arr = np.array(uris, dtype=object)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        feats = _feature_maker()({"id": arr, "uri": arr, "label": np.zeros(len(uris), np.int64)})
    assert [str(r) for r in feats["skip_reason"]] == ["", "", "missing", "", "", "", ""]


def test_missing_s3_objects_are_skips_and_one_client_serves_the_process(s3_bucket):
    import os

    import boto3

    bucket = s3_bucket[len("s3://"):]
    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).put_object(Bucket=bucket, Key="a.png",
                                                                               Body=_png())
    assert storage.filesystem(f"{s3_bucket}/a.png")[0] is storage.filesystem("s3://other/b")[0]
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f"{s3_bucket}/nothing.png")  # not retried: a fact about the data
    arr = np.array([f"{s3_bucket}/a.png", f"{s3_bucket}/nothing.png"], dtype=object)
    feats = _feature_maker()({"id": arr, "uri": arr, "label": np.zeros(2, np.int64)})
    assert [str(r) for r in feats["skip_reason"]] == ["", "missing"]
