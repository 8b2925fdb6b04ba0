// The API key the pages (status, docs) send when the server has auth on: asked for once,
// kept for this browser tab only (sessionStorage), sent as X-API-Key on each call they make.
"use strict";
window.torchshipKey = (() => {
  const NAME = "torchship.apiKey";
  let form = null;
  let memory = ""; // where sessionStorage is refused (some private modes)
  const retries = []; // what to run again once a key is entered

  function get() {
    try {
      return sessionStorage.getItem(NAME) || memory;
    } catch (err) {
      return memory;
    }
  }

  function set(key) {
    try {
      if (key) sessionStorage.setItem(NAME, key);
      else sessionStorage.removeItem(NAME);
    } catch (err) {
      // storage refused: the key lasts until the page reloads
    }
    memory = key;
  }

  // Headers for fetch(), with the key when there is one.
  function headers(extra = {}) {
    const key = get();
    return key ? { ...extra, "X-API-Key": key } : { ...extra };
  }

  // The server refused a call (401/403): show why, ask for a key, then run retry().
  function ask(status, body, retry) {
    retries.push(retry);
    if (!form) {
      form = document.createElement("form");
      form.id = "key-form";
      form.style.cssText = "display:flex;gap:8px;align-items:center;padding:10px 24px;" +
        "background:#fff8c5;border-bottom:1px solid #d4a72c;font:14px system-ui,sans-serif";
      const message = document.createElement("span");
      message.id = "key-message";
      const input = document.createElement("input");
      input.id = "key-input";
      input.type = "password";
      input.autocomplete = "off";
      input.placeholder = "API key";
      const button = document.createElement("button");
      button.type = "submit";
      button.textContent = "Use key";
      form.append(message, input, button);
      document.body.prepend(form);
    }
    const why = body && body.error ? body.error : `The server answered ${status}.`;
    form.querySelector("#key-message").textContent =
      status === 403 ? `${why} Enter another API key:` : `${why} Enter an API key:`;
    form.hidden = false;
    form.onsubmit = (event) => {
      event.preventDefault();
      const input = form.querySelector("#key-input");
      const key = input.value.trim();
      if (!key) return;
      set(key);
      input.value = "";
      form.hidden = true;
      for (const again of retries.splice(0)) again();
    };
    form.querySelector("#key-input").focus();
  }

  const refused = (status) => status === 401 || status === 403;
  return { get, set, headers, ask, refused };
})();
