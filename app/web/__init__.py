"""The medcad browser page: one HTML shell plus plain ES modules and CSS (no build step)."""

from app.web.router import mount_static, router

__all__ = ["mount_static", "router"]
