"""The real tensorflow-datasets code path, run offline (no mock_data).

``tests/test_data.py`` checks the adapters under ``tfds.testing.mock_data``,
which replaces tfds' builders and never imports what a real download and
preparation need. Here every registered tfds data set goes through the real,
unmocked ``tfds.load``: builder, info, registered download URLs and checksums,
then the download step, where the network is dead (``requests`` raises what it
raises without DNS, sockets refuse, tfds' GCS mirror stays disabled), so no
test ever touches the network and none waits for it. ``common.data.load`` must
then say that the download failed and name the embedded data set to use, as a
command-line flag.

The last test gives tfds' CIFAR-10 builder small local files in the data
set's own binary format instead of a download and checks that the whole
preparation (writing, splitting, reading) delivers exactly those pixels.

Run: .venv/bin/python -m pytest -q tests/test_data_tfds_offline.py
"""

import os
import socket
import urllib.error
import urllib.request

import numpy as np
import pytest
import requests
import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import gcs_utils

from common import data

# What each registered tfds data set should offer instead when it cannot be
# downloaded: an embedded data set of the same task.
EXPECTED_ALTERNATIVE = {
    "mnist": "digits", "cifar10": "shapes_classification", "cifar100": "shapes_classification",
    "oxford_iiit_pet": "shapes_classification", "voc/2007": "shapes", "coco/2017": "shapes",
}
EMBEDDED = ("shapes", "shapes_classification", "shapes_segmentation", "digits")


@pytest.fixture
def dead_network(monkeypatch):
    """Every way out of this process fails at once, as on a machine without a network.

    Returns the list of URLs tfds tried to download.
    """
    requested = []

    def no_connection(self, method, url, *args, **kwargs):
        requested.append(url)
        host = url.split("/")[2] if "//" in url else url
        raise requests.exceptions.ConnectionError(
            f"HTTPSConnectionPool(host={host!r}, port=443): Max retries exceeded with url: "
            f"{url} (Caused by NameResolutionError(\"Failed to resolve {host!r} ([Errno -3] "
            "Temporary failure in name resolution)\"))")

    def no_dns(*args, **kwargs):
        raise socket.gaierror(-3, "Temporary failure in name resolution")

    def no_urlopen(url, *args, **kwargs):
        requested.append(str(getattr(url, "full_url", url)))
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(requests.Session, "request", no_connection)  # tfds downloads with it
    monkeypatch.setattr(urllib.request, "urlopen", no_urlopen)  # ftp URLs
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)  # anything else
    monkeypatch.setattr(socket, "create_connection", no_dns)
    monkeypatch.setattr(gcs_utils, "_is_gcs_disabled", True)  # no gs://tfds-data lookups
    return requested


@pytest.mark.parametrize("name", data._TFDS_NAMES)
def test_real_tfds_path_reaches_the_download_and_names_the_network(name, tmp_path, dead_network):
    # The real builder and its metadata are available offline.
    builder = tfds.builder(name, data_dir=str(tmp_path))
    assert "image" in builder.info.features
    registered_urls = set(builder.url_infos or {})  # the data set's checksums.tsv
    assert registered_urls, f"{name}: tfds knows no download URL"

    with pytest.raises(data.DatasetUnavailableError) as error:
        data.load(name, "train", data_dir=str(tmp_path))
    message = str(error.value)
    # It got as far as the download: it asked for the data set's own files.
    assert dead_network and set(dead_network) <= registered_urls, dead_network
    assert isinstance(error.value.__cause__, requests.exceptions.ConnectionError)
    assert "download failed" in message and "network" in message and repr(name) in message
    alternative = EXPECTED_ALTERNATIVE.get(name)
    if alternative is None:  # a data set added later: any embedded one will do
        alternative = next(e for e in EMBEDDED if f"--dataset {e}`" in message)
    assert f"`--dataset {alternative}`" in message, message
    assert "not installed" not in message


def test_pet_segmentation_offline_offers_the_segmentation_flag(tmp_path, dead_network):
    with pytest.raises(data.DatasetUnavailableError, match="`--dataset shapes_segmentation`"):
        data.load("oxford_iiit_pet", "validation", task="segmentation", data_dir=str(tmp_path))
    assert dead_network


# A fresh interpreter in which `import importlib_resources` fails, as on a
# machine where it was never installed; the network is dead there too.
_WITHOUT_IMPORTLIB_RESOURCES = """
import sys
sys.modules["importlib_resources"] = None  # import now raises ModuleNotFoundError
import requests, socket

def dead(*args, **kwargs):
    raise socket.gaierror(-3, "Temporary failure in name resolution")

requests.Session.request = dead
socket.getaddrinfo = socket.create_connection = dead
from common import data
try:
    data.load("cifar10", data_dir=sys.argv[1])
except data.DatasetUnavailableError as error:
    print(error)
"""


def test_missing_module_is_named_not_blamed_on_the_network(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", _WITHOUT_IMPORTLIB_RESOURCES, str(tmp_path)],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    message = result.stdout
    assert result.returncode == 0, result.stderr[-3000:]
    assert "'importlib_resources' is not installed" in message, message
    assert "pip install -r requirements.txt" in message
    assert "network" not in message and "internet" not in message
    assert "`--dataset shapes_classification`" in message


def test_name_unknown_to_tfds_is_reported_as_such(tmp_path, dead_network):
    # A name registered here but absent from the installed tfds (a version
    # mismatch) goes through the real tfds registry lookup.
    with pytest.raises(data.DatasetUnavailableError) as error:
        data._tfds_load("no_such_data_set_xyz", "train", str(tmp_path), "classification")
    message = str(error.value)
    assert f"tensorflow-datasets {tfds.__version__} has no data set" in message
    assert "network" not in message and len(message) < 2000  # not tfds' list of every name
    assert not dead_network


def _write_cifar10_download(folder, rng, per_file=4):
    """CIFAR-10's binary files: each record is 1 label byte + 3072 bytes R, G, B planes."""
    files = {name: None for name in [f"data_batch_{i}.bin" for i in range(1, 6)]
             + ["test_batch.bin"]}
    batches = folder / "cifar-10-batches-bin"
    batches.mkdir(parents=True)
    for file_name in files:
        labels = rng.integers(0, 10, per_file).astype(np.uint8)
        planes = rng.integers(0, 256, (per_file, 3, 32, 32)).astype(np.uint8)  # [N, C, H, W]
        records = np.concatenate([labels[:, None], planes.reshape(per_file, -1)], axis=1)
        (batches / file_name).write_bytes(records.tobytes())
        files[file_name] = (labels, planes.transpose(0, 2, 3, 1))  # -> [N, H, W, C]
    (batches / "batches.meta.txt").write_text("\n".join(data.CIFAR10_CLASS_NAMES) + "\n")
    return files


def test_real_tfds_preparation_of_cifar10_from_local_files(tmp_path, dead_network, monkeypatch):
    files = _write_cifar10_download(tmp_path / "download", np.random.default_rng(0))
    asked = []

    def local_copy(self, url_or_urls):
        asked.append(url_or_urls)
        return str(tmp_path / "download")  # what download_and_extract returns: the folder

    monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract", local_copy)
    train = list(data.load("cifar10", "train", data_dir=str(tmp_path / "tfds")))
    validation = list(data.load("cifar10", "validation", data_dir=str(tmp_path / "tfds")))
    test = list(data.load("cifar10", "test", data_dir=str(tmp_path / "tfds")))
    assert asked == ["https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"]
    assert not dead_network
    # 20 training records: train[:90%] and train[90%:] of tfds' train split.
    assert (len(train), len(validation), len(test)) == (18, 2, 4)

    def as_pairs(examples):
        return sorted((np.round(e["image"].numpy() * 255).astype(np.uint8).tobytes(),
                       int(e["label"])) for e in examples)

    written_train = sorted((image.tobytes(), int(label))
                           for file_name, (labels, images) in files.items()
                           if file_name != "test_batch.bin" for image, label in zip(images, labels))
    labels, images = files["test_batch.bin"]
    assert as_pairs(train + validation) == written_train
    assert as_pairs(test) == sorted((image.tobytes(), int(label))
                                    for image, label in zip(images, labels))
