"""Pure data and pure decisions: no torch, ray, sqlalchemy, click or fastapi here."""
