"""Strict doubles for services that cannot run on this machine (Slack, Grafana).

Each checks every request against the published API specification in
``../shared/reference/`` and fails the request (and records the problem) when
it does not conform.
"""
