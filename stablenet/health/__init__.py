"""Health: active checks, Docker HEALTHCHECK status and passive ejection decide what is routed."""
