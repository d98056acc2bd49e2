"""A small Python client for the HTTP API, used by the CLI and the tests."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx

from runner.errors import RunnerError

LONG_POLL_SECONDS = 30.0
TERMINAL = {"succeeded", "failed", "timed_out", "canceled", "dead_letter"}


class ApiError(RunnerError):
    """The API answered with an error."""

    def __init__(self, status: int, code: str, message: str, request_id: str = "") -> None:
        super().__init__(f"{message} (HTTP {status}, {code})", status=status, code_=code,
                         request_id=request_id)
        self.status, self.code = status, code


class RunnerClient:
    """`RunnerClient(url, api_key)`: submit runs, read them, follow their logs."""

    def __init__(self, base_url: str, api_key: str, *, timeout: float = 30,
                 transport: httpx.BaseTransport | None = None) -> None:
        self._http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout,
                                  headers={"Authorization": f"Bearer {api_key}"},
                                  transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RunnerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check(self, response: httpx.Response) -> httpx.Response:
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
                raise ApiError(response.status_code, error["code"], error["message"],
                               error.get("request_id", ""))
            except (ValueError, KeyError, TypeError):
                raise ApiError(response.status_code, "http_error", response.text[:200]) from None
        return response

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._check(self._http.request(method, path, **kwargs))
        except httpx.TransportError as exc:
            raise RunnerError(f"cannot reach the API at {self._http.base_url}: {exc}") from exc

    def submit(self, processor: str, input: dict[str, Any] | None = None, *,
               version: str | None = None, timeout_seconds: int | None = None,
               labels: dict[str, str] | None = None,
               idempotency_key: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"processor": processor, "input": input or {}}
        if version is not None:
            body["version"] = version
        if timeout_seconds is not None:
            body["timeout_seconds"] = timeout_seconds
        if labels:
            body["labels"] = labels
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        run: dict[str, Any] = self._request("POST", "/v1/runs", json=body,
                                            headers=headers).json()
        return run

    def run(self, run_id: str) -> dict[str, Any]:
        run: dict[str, Any] = self._request("GET", f"/v1/runs/{run_id}").json()
        return run

    def runs(self, **filters: Any) -> dict[str, Any]:
        """A page of runs. Items carry `input` and `result` only when asked for:
        `include=["input", "result"]` (or `"input,result"`), each up to the server's
        cap; `omitted` in an item names what was left out (`run(id)` has it whole)."""
        params = {k: v for k, v in filters.items() if v is not None}
        if isinstance(params.get("include"), list | tuple | set | frozenset):
            params["include"] = ",".join(params["include"])
        page: dict[str, Any] = self._request("GET", "/v1/runs", params=params).json()
        return page

    def cancel(self, run_id: str) -> dict[str, Any]:
        run: dict[str, Any] = self._request("POST", f"/v1/runs/{run_id}/cancel").json()
        return run

    def replay(self, run_id: str) -> dict[str, Any]:
        run: dict[str, Any] = self._request("POST", f"/v1/runs/{run_id}/replay").json()
        return run

    def processors(self) -> dict[str, Any]:
        found: dict[str, Any] = self._request("GET", "/v1/processors").json()
        return found

    def logs(self, run_id: str, *, offset: int = 0) -> bytes:
        return self._request("GET", f"/v1/runs/{run_id}/logs",
                             params={"offset": offset}).content

    def follow_logs(self, run_id: str, *, offset: int = 0) -> Iterator[bytes]:
        """Output as it is captured, until the run ends.

        The server ends a follow stream after RUNNER_FOLLOW_MAX_SECONDS; this resumes
        from the last byte received until the run has ended.
        """
        while True:
            try:
                with self._http.stream("GET", f"/v1/runs/{run_id}/logs",
                                       params={"offset": offset, "follow": "true"},
                                       timeout=httpx.Timeout(30, read=None)) as response:
                    if response.status_code >= 400:
                        response.read()
                        self._check(response)
                    for chunk in response.iter_bytes():
                        offset += len(chunk)
                        yield chunk
            except httpx.TransportError as exc:
                raise RunnerError(f"log stream broke: {exc}") from exc
            if self.run(run_id)["status"] in TERMINAL:
                tail = self.logs(run_id, offset=offset)
                if tail:
                    yield tail
                return

    def wait(self, run_id: str, *, timeout: float = 600, poll: float = 0.1) -> dict[str, Any]:
        """Poll until the run ends; its final state.

        Raises:
            RunnerError: the run is not over after `timeout` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            # A long poll: the server answers as soon as the run ends.
            hold = max(0.0, min(LONG_POLL_SECONDS, deadline - time.monotonic()))
            run: dict[str, Any] = self._request("GET", f"/v1/runs/{run_id}",
                                                params={"wait": f"{hold:.2f}"},
                                                timeout=hold + 30).json()
            if run["status"] in TERMINAL:
                return run
            if time.monotonic() > deadline:
                raise RunnerError(f"run {run_id} still {run['status']} after {timeout:g}s")
            time.sleep(poll)
