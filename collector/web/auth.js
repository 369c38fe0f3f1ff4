// The fleet page's token, for a collector that has tokens (every read then needs one). Give it once in the
// page's address after a # (http://collector:9446/#token=SECRET: the part after # never leaves the browser),
// or type it into the box the page shows when the collector answers 401. It is kept in sessionStorage (this
// tab only, gone when the tab closes), taken out of the address bar at once so that it is neither bookmarked
// nor shared, and sent as "Authorization: Bearer" with every API request the page makes.
"use strict";

const gpufleetAuth = (() => {
  const KEY = "gpufleet.token";

  // #token=… (or ?token=…, which does reach the collector, but never its logs) → sessionStorage.
  function takeFromAddress() {
    const url = new URL(location.href);
    const hash = new URLSearchParams(url.hash.slice(1));
    const given = hash.get("token") || url.searchParams.get("token");
    if (!given) return;
    sessionStorage.setItem(KEY, given);
    hash.delete("token");
    url.searchParams.delete("token");
    const rest = hash.toString();
    history.replaceState(history.state, "", url.pathname + url.search + (rest ? "#" + rest : ""));
  }

  function token() {
    return sessionStorage.getItem(KEY) || "";
  }

  function form() {
    let f = document.getElementById("token-form");
    if (f) return f;
    f = document.createElement("form");
    f.id = "token-form";
    f.hidden = true;
    const label = document.createElement("label");
    label.textContent = "read token ";
    const input = document.createElement("input");
    input.type = "password";
    input.autocomplete = "off";
    input.id = "token-input";
    input.placeholder = "this collector needs a token to read";
    label.append(input);
    const button = document.createElement("button");
    button.type = "submit";
    button.textContent = "use";
    f.append(label, button);
    f.addEventListener("submit", (ev) => {
      ev.preventDefault();
      if (!input.value) return;
      sessionStorage.setItem(KEY, input.value.trim());
      input.value = "";
      f.hidden = true;
      document.dispatchEvent(new Event("gpufleet:token"));
    });
    (document.querySelector("header") || document.body).append(f);
    return f;
  }

  // fetch() with the token; a 401 (no token, or a wrong one) forgets it and asks for one.
  async function fetchApi(url, init = {}) {
    const headers = new Headers(init.headers || {});
    if (token()) headers.set("Authorization", `Bearer ${token()}`);
    const resp = await fetch(url, {...init, headers});
    if (resp.status === 401) {
      sessionStorage.removeItem(KEY);
      form().hidden = false;
    }
    return resp;
  }

  takeFromAddress();
  return {fetch: fetchApi, token};
})();
