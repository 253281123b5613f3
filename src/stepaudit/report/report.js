// Hover read-out for the report's time charts: the value of each series at the nearest recorded step.
// Plain DOM, no library; text goes in through textContent only.
(function () {
  "use strict";
  function fmt(v) {
    if (v === null || v === undefined) return "–";
    var a = Math.abs(v);
    if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(2);
    return String(+v.toPrecision(4));
  }
  function nearest(xs, x) {
    var lo = 0, hi = xs.length - 1;
    while (hi - lo > 1) {
      var mid = (lo + hi) >> 1;
      if (xs[mid] < x) lo = mid; else hi = mid;
    }
    return Math.abs(xs[lo] - x) <= Math.abs(xs[hi] - x) ? lo : hi;
  }
  function row(tip, color, text) {
    var line = document.createElement("div");
    if (color) {
      var dot = document.createElement("i");
      dot.style.background = color;
      line.appendChild(dot);
    }
    line.appendChild(document.createTextNode(text));
    tip.appendChild(line);
  }
  Array.prototype.forEach.call(document.querySelectorAll("svg.chart[data-tip]"), function (svg) {
    var series = JSON.parse(svg.getAttribute("data-tip"));
    var m = svg.getAttribute("data-x").split(",").map(Number);
    var xname = svg.getAttribute("data-xname") || "x";
    var box = svg.parentNode;
    var tip = box.querySelector(".tip");
    var cursor = svg.querySelector(".cursor");
    if (!tip || !cursor || !(m[1] > m[0])) return;
    function hide() { tip.style.display = "none"; cursor.style.opacity = 0; }
    svg.addEventListener("mousemove", function (event) {
      var point = svg.createSVGPoint();
      point.x = event.clientX; point.y = event.clientY;
      var p = point.matrixTransform(svg.getScreenCTM().inverse());
      if (p.x < m[2] || p.x > m[3]) { hide(); return; }
      var x = m[0] + (p.x - m[2]) / (m[3] - m[2]) * (m[1] - m[0]);
      var pixelsPerStep = (m[3] - m[2]) / (m[1] - m[0]);
      tip.textContent = "";
      var header = null, shown = 0;
      series.forEach(function (s) {
        if (!s.x.length) return;
        var i = nearest(s.x, x);
        if (Math.abs(s.x[i] - x) * pixelsPerStep > 14) return;
        if (header === null) { header = s.x[i]; row(tip, null, xname + " " + Math.round(header).toLocaleString()); }
        var text = s.n + ": " + fmt(s.y[i]);
        if (s.lo && s.hi) text += "  (min " + fmt(s.lo[i]) + ", max " + fmt(s.hi[i]) + ")";
        row(tip, s.c, text);
        shown += 1;
      });
      if (!shown) { hide(); return; }
      cursor.setAttribute("x1", p.x); cursor.setAttribute("x2", p.x);
      cursor.style.opacity = 0.35;
      var rect = box.getBoundingClientRect();
      tip.style.display = "block";
      var left = event.clientX - rect.left + 14;
      if (left + tip.offsetWidth > rect.width) left = event.clientX - rect.left - tip.offsetWidth - 14;
      tip.style.left = Math.max(0, left) + "px";
      tip.style.top = Math.max(0, event.clientY - rect.top - tip.offsetHeight - 8) + "px";
    });
    svg.addEventListener("mouseleave", hide);
  });
})();
