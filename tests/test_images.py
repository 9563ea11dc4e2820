"""``diffsamp.images``: saving images and the mapping of the data range to 8 bits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import diffsamp


def test_save_images_and_to_uint8_map_the_data_range(tmp_path):
    x = torch.tensor([-1.0, 0.0, 1.0]).reshape(1, 1, 1, 3)
    assert diffsamp.to_uint8(x).flatten().tolist() == [0, 128, 255]
    diffsamp.save_images(x[0], tmp_path / "one.png")
    assert np.asarray(Image.open(tmp_path / "one.png")).tolist() == [[0, 128, 255]]
    diffsamp.save_images(torch.zeros(4, 1, 5, 5), tmp_path / "grid.jpg", nrow=2)
    assert Image.open(tmp_path / "grid.jpg").format == "JPEG" and Image.open(tmp_path / "grid.jpg").size == (16, 16)
    with pytest.raises(ValueError, match="ending in"):
        diffsamp.save_images(x, tmp_path / "bad.txt")
