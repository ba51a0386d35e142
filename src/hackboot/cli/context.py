"""Global CLI options and the SDK client built from them."""

from __future__ import annotations

from dataclasses import dataclass

from hackboot.cli import config
from hackboot.cli.output import EXIT_AUTH, fail
from hackboot.sdk.client import Client


@dataclass
class CliState:
    profile: str = "default"
    url: str | None = None
    token: str | None = None
    project: str | None = None

    def resolved(self) -> config.Profile:
        prof = config.load(self.profile)
        return config.Profile(url=self.url or prof.url, token=self.token or prof.token,
                              project=self.project or prof.project, username=prof.username)

    def client(self, *, auth: bool = True) -> Client:
        prof = self.resolved()
        if auth and not prof.token:
            fail(f"Not logged in (profile '{self.profile}'): run `hackboot login` or set HACKBOOT_TOKEN",
                 EXIT_AUTH)
        return Client(prof.url, prof.token or None, project=prof.project or None)


state = CliState()
