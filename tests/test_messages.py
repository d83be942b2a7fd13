"""Messages the UI shows: URLs whole, server paths out (issue: 'https:/file.pkl' in the Start message)."""
import pytest

from demo.ui import scrub
from nada_core.store import weights
from tests.app_server import free_port


def test_scrub_keeps_urls_whole_and_drops_server_paths():
    text = scrub("download https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan2/ffhq-256.pkl by hand "
                 "and save it as /srv/data/uploads/ffhq-256.pkl.")
    assert "https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan2/ffhq-256.pkl by hand" in text
    assert "save it as ffhq-256.pkl." in text and "/srv" not in text


def test_an_offline_download_names_the_whole_url(tmp_path, monkeypatch):
    monkeypatch.setenv("NADA_WEIGHTS_DIR", str(tmp_path))
    url = f"http://127.0.0.1:{free_port()}/mirror/generators/ffhq-res256-mirror-paper256-noaug.pkl"  # nobody listens
    asset = weights.Asset(name="ffhq-256", kind="generator", file="generators/ffhq-256.pkl", url=url)
    with pytest.raises(weights.WeightsError) as e:
        weights.download(asset, timeout=2)
    shown = scrub(str(e.value))
    assert f"cannot reach {url} (" in shown and str(tmp_path) not in shown
    assert "save it as" in shown and "ffhq-256.pkl" in shown
    assert url in scrub(asset.how_to_get())   # the Start button's message for a missing base
