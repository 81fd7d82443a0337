"""The web studio: direct a story live in a browser (launch/studio.py)."""
