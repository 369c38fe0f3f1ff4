"""Strict doubles for services that cannot run on this machine (Slack, Grafana).

Each checks every request against an API specification kept in ``specs/`` beside
it (Slack's published one, copied whole under its MIT licence; for Grafana, whose
specification is AGPL-3.0, the project's own description of the endpoints it
calls) and fails the request (and records the problem) when it does not conform.
"""
