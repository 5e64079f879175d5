"""images.py: the numpy + Pillow preparation of images that disco-run feeds a model from a folder is the
fine-tuning driver's evaluation transform, torchvision's Resize + CenterCrop + ToTensor + Normalize."""
import numpy as np
import pytest
import skimage.data
from PIL import Image
from torchvision import transforms as T

from disco_compile.runtime import images
from disco_compile.errors import DataError

PHOTOS = {"astronaut": skimage.data.astronaut(), "coffee": skimage.data.coffee(), "camera": skimage.data.camera(),
          "small": skimage.data.astronaut()[:20, :37], "tall": skimage.data.astronaut()[:300, :41]}


def torchvision_eval(size):
    h, w = size
    return T.Compose([T.Resize(round(min(h, w) * 8 / 7)), T.CenterCrop((h, w)), T.ToTensor(),
                      T.Normalize(images.IMAGENET_MEAN, images.IMAGENET_STD)])


@pytest.mark.parametrize("size", [(224, 224), (32, 32), (25, 25), (100, 60), (60, 100), (7, 200)])
@pytest.mark.parametrize("photo", list(PHOTOS))
def test_prepare_is_torchvisions_evaluation_transform(photo, size):
    """Square and oblong sizes, grey and colour photos, and images smaller than the crop (zero padding)."""
    image = Image.fromarray(PHOTOS[photo])
    expected = torchvision_eval(size)(image.convert("RGB")).numpy()
    got = images.prepare(image, size)
    assert got.dtype == np.float32 and got.shape == (3, *size)
    np.testing.assert_array_equal(got, expected)


def test_read_folder_in_name_order_and_errors(tmp_path):
    for name, photo in (("b.png", "coffee"), ("a.jpg", "astronaut"), ("c.bmp", "camera")):
        Image.fromarray(PHOTOS[photo]).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    files, batch = images.read_folder(tmp_path, (16, 16))
    assert [f.name for f in files] == ["a.jpg", "b.png", "c.bmp"]
    assert batch.shape == (3, 3, 16, 16)
    np.testing.assert_array_equal(batch[1], images.read_image(tmp_path / "b.png", (16, 16)))
    (tmp_path / "d.png").write_bytes(b"broken")
    with pytest.raises(DataError, match="cannot read image .*d.png"):
        images.read_folder(tmp_path, (16, 16))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        images.read_folder(tmp_path / "empty", (16, 16))
    with pytest.raises(DataError, match="is not a folder"):
        images.read_folder(tmp_path / "a.jpg", (16, 16))
