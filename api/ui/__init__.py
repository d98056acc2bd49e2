"""The web dashboard served by the API process under ``/ui/``.

Server-rendered HTML (Jinja2, autoescaped) with a little hand-written JavaScript
for live updates; every page also works as plain HTML with JavaScript off. It is
a client of the same control-layer objects the ``/v1`` API uses, so it has the
same tenant scoping and roles.
"""
