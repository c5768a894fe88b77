"""What logs and delivery lists show of a webhook URL (api/notify/models.py `display_url`)."""

from __future__ import annotations

import pytest

from api.notify.models import display_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://hooks.slack.com/services/T000/B000/XXXXSECRET", "https://hooks.slack.com/…"),
        ("https://example.com/hook?token=abc", "https://example.com/…"),
        ("https://example.com:8443/", "https://example.com:8443/"),
        ("https://example.com", "https://example.com/"),
        ("http://[2001:db8::1]:9000/x", "http://[2001:db8::1]:9000/…"),
        ("https://user:pass@example.com/", "https://example.com/…"),  # a credential too
    ],
)
def test_only_scheme_host_and_port_are_shown(url: str, shown: str) -> None:
    assert display_url(url) == shown
