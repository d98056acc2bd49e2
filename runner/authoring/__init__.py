"""The authoring layer: what processor authors and the dev stack use.

Owns building and publishing a processor image and pinning it by digest
(`publish`), one production-exact run on this machine (`localrun`, through the
sandbox and the executor's own classification and wiring) and the local development
stack (`devstack`).

May import: the shared modules, `runner.manifest`, `runner.observability`,
`runner.sandbox`, `runner.control` and `runner.execution`. Only the CLI imports it.
"""
