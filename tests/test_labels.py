import pytest

from pipeline.labels import clean_class_name


@pytest.mark.parametrize("raw,expected", [
    ("Tomato___Late_blight", "tomato late blight"),
    ("Corn_(maize)___Common_rust_", "corn (maize) common rust"),
    ("Tomato___Tomato_mosaic_virus", "tomato mosaic virus"),
    ("Pepper,_bell___Bacterial_spot", "pepper bell bacterial spot"),
    ("Apple___healthy", "apple healthy"),
    ("Cherry_(including_sour)___Powdery_mildew", "cherry (including sour) powdery mildew"),
    ("Tomato___Spider_mites Two-spotted_spider_mite", "tomato spider mites two spotted spider mite"),
    ("BrownSwiss", "brown swiss"),
    ("CBSD", "cbsd"),
    ("  angular_leaf_spot ", "angular leaf spot"),
    ("Orange___Haunglongbing_(Citrus_greening)", "orange haunglongbing (citrus greening)"),
])
def test_plantvillage_style_names(raw, expected):
    assert clean_class_name(raw) == expected


def test_override_wins():
    assert clean_class_name("CBSD", {"CBSD": "cassava brown streak disease"}) == "cassava brown streak disease"


def test_never_empty():
    assert clean_class_name("___") == "___"
    assert clean_class_name("../..") != ""
