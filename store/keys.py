"""API keys: ``onp_<prefix>_<secret>``; only the sha256 of the whole key is stored.

The secret has 256 bits of entropy, so a plain (unsalted) sha256 is enough: the hash
is a lookup key that cannot be brute-forced, and lookups stay one indexed query.
"""
from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from .models import ApiKey, User, utcnow

KEY_PREFIX = "onp_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass
class NewKey:
    key: str  # shown once, never stored
    record: ApiKey
    user: User


def get_or_create_user(s: Session, name: str) -> User:
    user = s.scalar(select(User).where(User.name == name))
    if user is None:
        user = User(name=name)
        s.add(user)
        s.flush()
    return user


def create_key(s: Session, user_name: str, name: str = "") -> NewKey:
    user = get_or_create_user(s, user_name)
    prefix = secrets.token_hex(4)
    key = f"{KEY_PREFIX}{prefix}_{secrets.token_urlsafe(32)}"
    record = ApiKey(user_id=user.id, name=name, prefix=prefix, key_hash=hash_key(key))
    s.add(record)
    s.flush()
    return NewKey(key, record, user)


def authenticate(s: Session, key: str) -> User | None:
    """The user owning an active key, or None; records when the key was last used (1-minute granularity)."""
    if not key.startswith(KEY_PREFIX):
        return None
    record = s.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None)))
    if record is None:
        return None
    now = utcnow()
    if record.last_used_at is None or (now - record.last_used_at).total_seconds() > 60:
        record.last_used_at = now
    return s.get(User, record.user_id)


def list_keys(s: Session, user_name: str | None = None) -> list[tuple[ApiKey, User]]:
    q = select(ApiKey, User).join(User, User.id == ApiKey.user_id).order_by(ApiKey.created_at)
    if user_name:
        q = q.where(User.name == user_name)
    return [(k, u) for k, u in s.execute(q).all()]


def revoke_key(s: Session, prefix: str) -> bool:
    """Revoke the active key(s) with this prefix; False when none matched."""
    keys = s.scalars(select(ApiKey).where(ApiKey.prefix == prefix, ApiKey.revoked_at.is_(None))).all()
    when: datetime = utcnow()
    for k in keys:
        k.revoked_at = when
    return bool(keys)


def has_active_keys(s: Session) -> bool:
    return s.scalar(select(ApiKey.id).where(ApiKey.revoked_at.is_(None)).limit(1)) is not None
