// Live updates of a screen: listen to its event stream and reload the part of the page that
// changed (the server renders it; this script only swaps it in). The page works without it.
(function () {
  "use strict";
  var root = document.querySelector("[data-live-stream]");
  if (!root || !root.dataset.liveStream || !window.EventSource || !window.fetch) return;
  var status = document.getElementById("live-status");
  var loading = false, again = false, connected = false;
  function say(text) { if (status) status.textContent = text; }
  function reload() {
    if (loading) { again = true; return; }
    loading = true;
    fetch(root.dataset.liveFragment, { credentials: "same-origin", headers: { Accept: "text/html" } })
      .then(function (response) { return response.ok ? response.text() : null; })
      .then(function (html) {
        if (html !== null) {
          root.innerHTML = html;
          var shown = document.getElementById("shown-at");  // the server's time, in its zone
          say(root.dataset.liveUpdated + " " + (shown ? shown.textContent : ""));
        }
      })
      .catch(function () {})
      .then(function () { loading = false; if (again) { again = false; reload(); } });
  }
  // A lost connection is retried by the browser itself; a refused one (the service busy, a
  // token's streams all open, a restart's 502 at a proxy) closes the stream: try again later.
  var REFUSED_RETRY_MS = 30000;
  function listen() {
    var stream = new EventSource(root.dataset.liveStream);
    stream.addEventListener("view", reload);
    stream.addEventListener("ready", function () {
      if (connected) reload();  // back after a lost connection: catch up
      connected = true;
    });
    stream.onerror = function () {
      say(root.dataset.liveLost);
      if (stream.readyState === EventSource.CLOSED) {
        connected = true;  // whatever it missed meanwhile is read on its ready
        setTimeout(listen, REFUSED_RETRY_MS);
      }
    };
  }
  listen();
})();
