"""Kubernetes deployment: the Helm chart (helm/asyncdiff) and its renderer/validator (render.py)."""
