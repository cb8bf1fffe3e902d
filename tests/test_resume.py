"""Resuming a run: a checkpoint downloaded from a bucket never writes outside the local stage."""

import boto3
import pytest

from vqtok.errors import StorageError
from vqtok.storage import Location

# ------------------------------------------------------------------------------------- hostile keys and files


def test_download_refuses_a_key_that_would_leave_the_folder_before_writing_anything(bucket, s3_endpoint, tmp_path):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    for key in ("ck/a.txt", "ck/sub/b.txt"):
        s3.put_object(Bucket=bucket.name, Key=key, Body=key.encode())
    clean = tmp_path / "clean"
    Location(bucket.url("ck")).download(clean)
    assert (clean / "a.txt").read_text() == "ck/a.txt" and (clean / "sub" / "b.txt").read_text() == "ck/sub/b.txt"

    for key in ("ck/../../escape.txt", "ck//tmp/escape.txt"):
        s3.put_object(Bucket=bucket.name, Key=key, Body=b"planted")
        stage = tmp_path / "stage" / "folder"
        with pytest.raises(StorageError) as refused:
            Location(bucket.url("ck")).download(stage)
        assert key in str(refused.value) and "outside" in str(refused.value) and "\n" not in str(refused.value)
        assert not (tmp_path / "stage").exists()  # nothing written, not even the clean keys
        assert not list(tmp_path.rglob("escape.txt"))
        s3.delete_object(Bucket=bucket.name, Key=key)
