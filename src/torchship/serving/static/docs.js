// API docs: Swagger UI (/docs) or ReDoc (/redoc) from libraries the server ships, so they
// work offline. The spec and "Try it out" calls carry the API key when the server needs one.
"use strict";
(() => {
  const root = document.getElementById("docs");
  const { kind, spec: specUrl } = root.dataset;

  function fail(message) {
    root.textContent = message;
    root.style.cssText = "padding:16px 24px;font:14px system-ui,sans-serif;color:#cf222e";
    root.setAttribute("data-state", "error");
  }

  async function load() {
    let r;
    try {
      r = await fetch(specUrl, { headers: torchshipKey.headers({ Accept: "application/json" }) });
    } catch (err) {
      fail(`Cannot fetch ${specUrl}: ${err}`);
      return;
    }
    if (torchshipKey.refused(r.status)) {
      torchshipKey.ask(r.status, await r.json().catch(() => null), load);
      return;
    }
    if (!r.ok) {
      fail(`${specUrl} answered ${r.status}.`);
      return;
    }
    const spec = await r.json();
    root.removeAttribute("style");
    if (kind === "redoc") {
      Redoc.init(spec, {}, root, () => root.setAttribute("data-state", "loaded"));
      return;
    }
    window.ui = SwaggerUIBundle({
      spec,
      dom_id: "#docs",
      deepLinking: true,
      showExtensions: true,
      showCommonExtensions: true,
      presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
      layout: "BaseLayout",
      validatorUrl: null, // the default badge is an image from validator.swagger.io
      requestInterceptor: (request) => {
        // the key goes to this server only, never to another host a spec might name
        const key = torchshipKey.headers()["X-API-Key"];
        const sameOrigin = new URL(request.url, location.href).origin === location.origin;
        if (key && sameOrigin && !request.headers["X-API-Key"] && !request.headers.Authorization) {
          request.headers["X-API-Key"] = key;
        }
        return request;
      },
      onComplete: () => root.setAttribute("data-state", "loaded"),
    });
  }

  load();
})();
