"""How the package finds and loads libmoe.so (python/libmoe/_lib.py): the
file it loaded, and the message when a wheel's CUDA libraries are missing."""

import os
import pathlib

import libmoe
import libmoe._lib as L


def test_loaded_library_is_reported():
    p = pathlib.Path(L.LIBRARY_PATH)
    assert p.is_file()
    env = os.environ.get("LIBMOE_LIBRARY")
    if env:
        assert p == pathlib.Path(env)
    else:  # the package's own copy (an installed wheel or `pip install .`)
        pkg = pathlib.Path(libmoe.__file__).resolve().parent
        assert p.resolve().parent == pkg / "lib"


def test_missing_cuda_library_message():
    err = OSError("libcudart.so.13: cannot open shared object file: "
                  "No such file or directory")
    msg = L._load_error(pathlib.Path("/x/libmoe/lib/libmoe.so"), err)
    # names the missing library, its CUDA major, this torch, and the way out
    assert "libcudart.so.13" in msg and "CUDA 13" in msg
    assert L.torch.__version__ in msg
    assert "CPU wheel" in msg and "/x/libmoe/lib/libmoe.so" in msg


def test_other_load_error_message():
    err = OSError("/x/libmoe.so: invalid ELF header")
    msg = L._load_error(pathlib.Path("/x/libmoe.so"), err)
    assert "invalid ELF header" in msg and "Install" in msg
