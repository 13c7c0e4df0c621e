"""Offline fixtures: tiny diffusers pipelines built from configs (random weights), for tests and smoke runs."""
