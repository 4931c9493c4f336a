/* The circuit viewer of `icl circuit serve`.
 *
 * Reads what the server lists (data/graph-metadata.json) and one graph at a time
 * (graph_data/<slug>.json), both in circuit-tracer's attribution-graph format as
 * icl_cli/circuit/export.py writes it, and draws:
 *   1. the link graph: one column per token role (metadata.prompt_tokens, ctx_idx), one row per
 *      (layer, site) of the circuit (node.layer, named by metadata.row_labels), the roles' row at
 *      the bottom and the metric's node at the top; nodes whose cumulative influence share
 *      (node.influence) is above the slider's value are hidden;
 *   2. the hovered or clicked node's details, and the clicked node's inputs and outputs with
 *      their weights (metadata.weight_unit);
 *   3. the pinned nodes as a subgraph laid out by dagre (integer edge weights: dagre's network
 *      simplex fails on fractional ones).
 * State (graph, threshold, clicked and pinned nodes) lives in the URL, so a view can be shared.
 */
(function () {
  'use strict';

  var SITE_COLOUR = {resid: '#4e79a7', attn: '#f28e2b', transcoder: '#59a14f'};
  var SITE_NAME = {resid: 'resid_pre SAE', attn: 'attn_out SAE', transcoder: 'transcoder'};
  var TYPE_SITE = {
    'resid sae': 'resid', 'attention sae': 'attn', 'transcoder': 'transcoder',
    'resid reconstruction error': 'resid', 'attention reconstruction error': 'attn',
    'mlp reconstruction error': 'transcoder', 'cross layer transcoder': 'transcoder',
  };
  var POSITIVE = '#2166ac', NEGATIVE = '#b2182b';
  var MAX_BACKGROUND_LINKS = 1500, MAX_LISTED = 40, PIN_TOP = 12;

  var params = new URLSearchParams(location.search);
  var state = {graphs: [], slug: null, data: null, threshold: 1, clickedId: null, hoveredId: null, pinned: []};
  var weightFormat = d3.format('+.3r');
  var numberFormat = d3.format('.3r');
  var tooltip = d3.select('#tooltip');

  // ---- data -------------------------------------------------------------------------------
  function siteOf(node) {
    return node.site || TYPE_SITE[node.feature_type] || null;
  }

  function isError(node) {
    return /error/.test(node.feature_type);
  }

  function streamOf(node, nRows) {
    if (node.layer === 'E') return 0;
    if (node.feature_type === 'logit') return nRows + 1;
    return +node.layer + 1;
  }

  function prepare(doc) {
    var meta = doc.metadata;
    var rowLabels = meta.row_labels || [];
    var nRows = rowLabels.length || (d3.max(doc.nodes.filter(function (d) { return d.layer !== 'E' && d.feature_type !== 'logit'; }),
      function (d) { return +d.layer; }) + 1) || 0;
    var byId = new Map();
    doc.nodes.forEach(function (d) {
      d.id = d.node_id;
      d.stream = streamOf(d, nRows);
      d.site = siteOf(d);
      d.inputs = [];
      d.outputs = [];
      byId.set(d.id, d);
    });
    var links = doc.links.filter(function (l) { return byId.has(l.source) && byId.has(l.target); });
    links.forEach(function (l) {
      l.sourceNode = byId.get(l.source);
      l.targetNode = byId.get(l.target);
      l.abs = Math.abs(l.weight);
      l.sourceNode.outputs.push(l);
      l.targetNode.inputs.push(l);
    });
    doc.nodes.forEach(function (d) {
      d.inputs.sort(function (a, b) { return b.abs - a.abs; });
      d.outputs.sort(function (a, b) { return b.abs - a.abs; });
    });
    // each node's own share of influence: the step of the cumulative share at its rank
    var ranked = doc.nodes.filter(function (d) { return typeof d.influence === 'number'; })
      .sort(function (a, b) { return a.influence - b.influence; });
    ranked.forEach(function (d, i) { d.share = d.influence - (i ? ranked[i - 1].influence : 0); });
    var maxShare = d3.max(ranked, function (d) { return d.share; }) || 1;
    ranked.forEach(function (d) { d.share /= maxShare; });
    var influences = doc.nodes.map(function (d) { return d.influence; }).filter(function (v) { return typeof v === 'number'; });
    return {meta: meta, nodes: doc.nodes, links: links, byId: byId, nRows: nRows, rowLabels: rowLabels,
            qParams: doc.qParams || {}, maxInfluence: d3.max(influences) || 1};
  }

  function visibleNodes(data) {
    return data.nodes.filter(function (d) {
      return typeof d.influence !== 'number' || d.influence <= state.threshold + 1e-12 || state.pinned.indexOf(d.id) >= 0;
    });
  }

  // ---- URL state -----------------------------------------------------------------------------
  function saveUrl() {
    var p = new URLSearchParams();
    p.set('slug', state.slug);
    p.set('threshold', state.threshold.toFixed(2));
    if (state.clickedId) p.set('clickedId', state.clickedId);
    if (state.pinned.length) p.set('pinnedIds', state.pinned.join(','));
    history.replaceState(null, '', '?' + p.toString());
  }

  // ---- the link graph ------------------------------------------------------------------------
  // area grows with the node's own share of influence, so the nodes that matter stand out
  function symbolFor(d) {
    if (d.feature_type === 'logit' || d.feature_type === 'embedding') return d3.symbol(d3.symbolSquare, 80)();
    var area = 26 + 100 * Math.sqrt(d.share || 0);
    return d3.symbol(isError(d) ? d3.symbolDiamond : d3.symbolCircle, isError(d) ? area * 1.3 : area)();
  }

  function fillFor(d) {
    if (d.feature_type === 'logit') return '#222';
    if (d.feature_type === 'embedding') return '#bbb';
    var c = SITE_COLOUR[d.site] || '#999';
    return isError(d) ? d3.color(c).brighter(0.9).formatHex() : c;
  }

  function layoutNodes(data, nodes, width, height) {
    var nStreams = data.nRows + 2;
    var y = d3.scaleBand(d3.range(nStreams), [height, 0]).paddingInner(0.12);
    var cells = d3.group(nodes, function (d) { return d.ctx_idx; }, function (d) { return d.stream; });
    var ctxs = Array.from(cells.keys()).sort(d3.ascending);
    var weights = ctxs.map(function (c) {
      return Math.max(3, d3.max(Array.from(cells.get(c).values()), function (g) { return g.length; }));
    });
    // every column gets at least minWidth (so its label fits), the rest by its busiest cell
    var minWidth = Math.min(90, width / Math.max(ctxs.length, 1));
    var spare = width - minWidth * ctxs.length;
    var total = d3.sum(weights);
    var left = 0, columns = [];
    ctxs.forEach(function (c, i) {
      var w = minWidth + spare * weights[i] / total;
      columns.push({ctx: c, x0: left, x1: left + w});
      left += w;
    });
    var spacing = 11, pad = 6;
    columns.forEach(function (col) {
      cells.get(col.ctx).forEach(function (group, stream) {
        var inner = Math.max(10, col.x1 - col.x0 - 2 * pad);
        var perLine = Math.max(1, Math.floor(inner / spacing));
        var lines = Math.ceil(group.length / perLine);
        var dy = Math.min(11, y.bandwidth() / Math.max(lines, 1));
        var sorted = group.slice().sort(function (a, b) {
          return d3.ascending(a.influence == null ? -1 : a.influence, b.influence == null ? -1 : b.influence);
        });
        var step = Math.min(14, inner / Math.min(group.length, perLine));
        sorted.forEach(function (d, i) {
          var line = Math.floor(i / perLine), k = i % perLine;
          var inLine = Math.min(perLine, group.length - line * perLine);
          var mid = (col.x0 + col.x1) / 2;
          d.x = mid + (k - (inLine - 1) / 2) * step;
          d.y = y(stream) + y.bandwidth() / 2 + (line - (lines - 1) / 2) * dy;
        });
      });
    });
    return {y: y, columns: columns};
  }

  function drawLinkGraph() {
    var data = state.data;
    var box = document.getElementById('link-graph');
    var margin = {top: 12, right: 16, bottom: 46, left: 118};
    var width = Math.max(500, box.clientWidth - margin.left - margin.right);
    var height = Math.max(360, Math.min(900, 46 * (data.nRows + 2)));
    var nodes = visibleNodes(data);
    var shown = new Set(nodes.map(function (d) { return d.id; }));
    var links = data.links.filter(function (l) { return shown.has(l.source) && shown.has(l.target); });
    var geo = layoutNodes(data, nodes, width, height);

    var svg = d3.select(box).html('').append('svg')
      .attr('width', width + margin.left + margin.right).attr('height', height + margin.top + margin.bottom);
    var g = svg.append('g').attr('transform', 'translate(' + margin.left + ',' + margin.top + ')');

    // rows: bands with their labels
    var streams = d3.range(data.nRows + 2);
    g.append('g').selectAll('rect').data(streams).join('rect')
      .attr('x', 0).attr('width', width).attr('y', function (s) { return geo.y(s); }).attr('height', geo.y.bandwidth())
      .attr('class', function (s) { return 'band ' + (s === 0 || s === data.nRows + 1 ? 'band-end' : 'band-' + (s % 2)); });
    g.append('g').attr('class', 'row-labels').selectAll('text').data(streams).join('text')
      .attr('x', -8).attr('y', function (s) { return geo.y(s) + geo.y.bandwidth() / 2; })
      .attr('dy', '0.35em').attr('text-anchor', 'end')
      .text(function (s) {
        if (s === 0) return 'roles';
        if (s === data.nRows + 1) return 'metric';
        return data.rowLabels[s - 1] || ('row ' + (s - 1));
      });
    // columns: separators and the role (token) of each
    var tokens = data.meta.prompt_tokens || [];
    var colSel = g.append('g').attr('class', 'columns').selectAll('g').data(geo.columns).join('g');
    colSel.append('line').attr('x1', function (c) { return c.x0; }).attr('x2', function (c) { return c.x0; })
      .attr('y1', 0).attr('y2', height).attr('class', 'col-sep');
    var narrow = d3.min(geo.columns, function (c) { return c.x1 - c.x0; }) < 46;
    colSel.append('text').attr('class', 'col-label')
      .attr('transform', function (c) { return 'translate(' + (c.x0 + c.x1) / 2 + ',' + (height + 16) + ')' + (narrow ? ' rotate(-35)' : ''); })
      .attr('text-anchor', narrow ? 'end' : 'middle')
      .text(function (c) { return tokens[c.ctx] !== undefined ? tokens[c.ctx] : 'ctx ' + c.ctx; });

    // links: the strongest ones faintly, the clicked node's in colour
    var maxAbs = d3.max(links, function (l) { return l.abs; }) || 1;
    var background = links.slice().sort(function (a, b) { return b.abs - a.abs; }).slice(0, MAX_BACKGROUND_LINKS);
    g.append('g').attr('class', 'links-bg').selectAll('line').data(background).join('line')
      .attr('x1', function (l) { return l.sourceNode.x; }).attr('y1', function (l) { return l.sourceNode.y; })
      .attr('x2', function (l) { return l.targetNode.x; }).attr('y2', function (l) { return l.targetNode.y; })
      .attr('stroke-opacity', function (l) { return 0.04 + 0.25 * Math.sqrt(l.abs / maxAbs); });
    var clickedLayer = g.append('g').attr('class', 'links-clicked');

    var nodeSel = g.append('g').attr('class', 'nodes').selectAll('path').data(nodes, function (d) { return d.id; }).join('path')
      .attr('class', 'node')
      .attr('d', symbolFor)
      .attr('transform', function (d) { return 'translate(' + d.x + ',' + d.y + ')'; })
      .attr('fill', fillFor)
      .attr('data-node-id', function (d) { return d.id; })
      .on('mouseover', function (ev, d) { state.hoveredId = d.id; showTooltip(ev, d); drawDetail(); })
      .on('mousemove', function (ev, d) { showTooltip(ev, d); })
      .on('mouseout', function () { state.hoveredId = null; tooltip.classed('hidden', true); drawDetail(); })
      .on('click', function (ev, d) {
        if (ev.shiftKey) { togglePin(d.id); return; }
        state.clickedId = state.clickedId === d.id ? null : d.id;
        update();
      });

    state.redrawClicked = function () {
      var c = state.clickedId && data.byId.get(state.clickedId);
      var mine = c ? c.inputs.concat(c.outputs).filter(function (l) { return shown.has(l.source) && shown.has(l.target); }) : [];
      var localMax = d3.max(mine, function (l) { return l.abs; }) || 1;
      clickedLayer.selectAll('line').data(mine).join('line')
        .attr('x1', function (l) { return l.sourceNode.x; }).attr('y1', function (l) { return l.sourceNode.y; })
        .attr('x2', function (l) { return l.targetNode.x; }).attr('y2', function (l) { return l.targetNode.y; })
        .attr('stroke', function (l) { return l.weight >= 0 ? POSITIVE : NEGATIVE; })
        .attr('stroke-width', function (l) { return 0.6 + 3.4 * Math.sqrt(l.abs / localMax); });
      var near = new Set(mine.map(function (l) { return l.source; }).concat(mine.map(function (l) { return l.target; })));
      nodeSel
        .classed('clicked', function (d) { return d.id === state.clickedId; })
        .classed('pinned', function (d) { return state.pinned.indexOf(d.id) >= 0; })
        .classed('faded', function (d) { return !!c && d.id !== c.id && !near.has(d.id) && d.feature_type !== 'embedding'; });
      g.select('.links-bg').attr('opacity', c ? 0.35 : 1);
    };
    state.redrawClicked();
    d3.select('#counts').text(
      (nodes.length - nodes.filter(function (d) { return d.feature_type === 'embedding'; }).length) + ' nodes, ' +
      links.length + ' links shown (of ' + data.links.length + ')');
  }

  function showTooltip(ev, d) {
    var html = '<b>' + escapeHtml(d.clerp || d.id) + '</b>';
    if (typeof d.ie === 'number') html += '<br>IE ' + weightFormat(d.ie) + ' · influence ' + numberFormat(d.influence);
    tooltip.html(html).classed('hidden', false)
      .style('left', Math.min(ev.clientX + 14, window.innerWidth - 320) + 'px')
      .style('top', (ev.clientY + 14) + 'px');
  }

  function escapeHtml(text) {
    return String(text).replace(/[&<>"]/g, function (c) { return {'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;'}[c]; });
  }

  // ---- side panel ----------------------------------------------------------------------------
  function drawDetail() {
    var data = state.data;
    var d = data.byId.get(state.hoveredId) || data.byId.get(state.clickedId);
    var box = d3.select('#detail').html('');
    if (!d) {
      box.append('div').attr('class', 'hint')
        .text('Hover a node for its label; click it for its inputs and outputs; shift-click (or “pin”) adds it to the subgraph below.');
      drawTopNodes(box);
      return;
    }
    box.append('div').attr('class', 'detail-title').text(d.clerp || d.id);
    var rows = [];
    if (d.site) rows.push(['dictionary', (SITE_NAME[d.site] || d.site) + (isError(d) ? ' (error node)' : '')]);
    if (d.model_layer !== undefined) rows.push(['layer', d.model_layer]);
    rows.push(['column', (data.meta.prompt_tokens || [])[d.ctx_idx]]);
    if (d.feature >= 0 && d.feature_type !== 'logit' && d.feature_type !== 'embedding') rows.push(['feature', d.feature]);
    if (typeof d.ie === 'number') rows.push(['IE', weightFormat(d.ie) + ' × ' + data.meta.weight_unit]);
    if (typeof d.activation === 'number') rows.push([isError(d) ? '|error|' : 'activation', numberFormat(d.activation)]);
    if (typeof d.influence === 'number') rows.push(['influence', numberFormat(d.influence) + ' (cumulative share)']);
    if (d.feature_type === 'logit') rows.push(['p', numberFormat(d.token_prob)]);
    rows.push(['links', d.inputs.length + ' in, ' + d.outputs.length + ' out']);
    var table = box.append('table').attr('class', 'detail-table');
    rows.forEach(function (r) {
      var tr = table.append('tr');
      tr.append('th').text(r[0]);
      tr.append('td').text(r[1]);
    });
    if (d.feature_type !== 'embedding') {
      box.append('button').attr('class', 'pin-button')
        .text(state.pinned.indexOf(d.id) >= 0 ? 'unpin' : 'pin')
        .on('click', function () { togglePin(d.id); });
    }
  }

  // with nothing selected: the most influential nodes shown, each a link to its details
  function drawTopNodes(box) {
    var top = visibleNodes(state.data).filter(function (d) { return typeof d.influence === 'number'; })
      .sort(function (a, b) { return a.influence - b.influence; }).slice(0, 25);
    if (!top.length) return;
    box.append('h3').text('Most influential nodes');
    var table = box.append('table').attr('class', 'conn-table');
    top.forEach(function (d) {
      var tr = table.append('tr').attr('class', 'conn-row top-row').on('click', function () { state.clickedId = d.id; update(); });
      tr.append('td').append('span').attr('class', 'swatch').style('background', fillFor(d));
      tr.append('td').attr('class', 'conn-label').text(d.clerp || d.id);
      tr.append('td').attr('class', 'conn-weight').style('color', d.ie >= 0 ? POSITIVE : NEGATIVE)
        .attr('title', 'IE in ' + state.data.meta.weight_unit).text(weightFormat(d.ie));
    });
    box.append('div').attr('class', 'hint').text('IE in ' + state.data.meta.weight_unit);
  }

  function drawConnections() {
    var data = state.data;
    var box = d3.select('#connections').html('');
    var d = data.byId.get(state.clickedId);
    if (!d) return;
    [['Inputs', d.inputs, 'sourceNode'], ['Outputs', d.outputs, 'targetNode']].forEach(function (part) {
      var list = part[1];
      box.append('h3').text(part[0] + ' (' + list.length + ')');
      if (!list.length) { box.append('div').attr('class', 'hint').text('none in the pruned graph'); return; }
      var table = box.append('table').attr('class', 'conn-table');
      list.slice(0, MAX_LISTED).forEach(function (l) {
        var other = l[part[2]];
        var tr = table.append('tr').attr('class', 'conn-row').on('click', function () { state.clickedId = other.id; update(); });
        tr.append('td').append('span').attr('class', 'swatch').style('background', fillFor(other));
        tr.append('td').attr('class', 'conn-label').text(other.clerp || other.id);
        tr.append('td').attr('class', 'conn-weight').style('color', l.weight >= 0 ? POSITIVE : NEGATIVE).text(weightFormat(l.weight));
      });
      if (list.length > MAX_LISTED) box.append('div').attr('class', 'hint').text('… and ' + (list.length - MAX_LISTED) + ' more');
    });
    box.append('div').attr('class', 'hint').text('weights in ' + data.meta.weight_unit);
  }

  // ---- pinned subgraph (dagre) ---------------------------------------------------------------
  function togglePin(id) {
    var i = state.pinned.indexOf(id);
    if (i >= 0) state.pinned.splice(i, 1); else state.pinned.push(id);
    update();
  }

  function shortLabel(d) {
    if (d.feature_type === 'logit') return 'metric: ' + (state.data.meta.icl && state.data.meta.icl.metric || 'output');
    var site = {resid: 'resid', attn: 'attn', transcoder: 'tc'}[d.site] || d.feature_type;
    var what = isError(d) ? 'err' : '#' + d.feature;
    var role = (state.data.meta.prompt_tokens || [])[d.ctx_idx];
    return 'L' + d.model_layer + ' ' + site + ' ' + what + ' @' + role;
  }

  function drawSubgraph() {
    var data = state.data;
    var svg = d3.select('#subgraph-svg').html('');
    var pinned = state.pinned.map(function (id) { return data.byId.get(id); }).filter(Boolean);
    d3.select('#subgraph-hint').style('display', pinned.length ? 'none' : null);
    if (!pinned.length) { svg.attr('width', 0).attr('height', 0); return; }
    var set = new Set(pinned.map(function (d) { return d.id; }));
    var links = data.links.filter(function (l) { return set.has(l.source) && set.has(l.target); });
    var maxAbs = d3.max(links, function (l) { return l.abs; }) || 1;
    var nodeW = 178, nodeH = 36;
    var gr = new dagre.graphlib.Graph();
    gr.setGraph({rankdir: 'BT', nodesep: 18, ranksep: 46, marginx: 10, marginy: 10});
    gr.setDefaultEdgeLabel(function () { return {}; });
    pinned.forEach(function (d) { gr.setNode(d.id, {width: nodeW, height: nodeH}); });
    links.forEach(function (l) {
      // integer weights (1-10): fractional ones make dagre's network simplex fail
      gr.setEdge(l.source, l.target, {weight: 1 + Math.round(9 * l.abs / maxAbs), width: 36, height: 12, labelpos: 'c'});
    });
    dagre.layout(gr);
    var size = gr.graph();
    svg.attr('width', Math.max(size.width, 200)).attr('height', Math.max(size.height, 60));
    var line = d3.line().x(function (p) { return p.x; }).y(function (p) { return p.y; }).curve(d3.curveBasis);
    var edgeSel = svg.append('g').selectAll('g').data(links).join('g').attr('class', 'sg-edge');
    edgeSel.append('path')
      .attr('d', function (l) { return line(gr.edge(l.source, l.target).points); })
      .attr('stroke', function (l) { return l.weight >= 0 ? POSITIVE : NEGATIVE; })
      .attr('stroke-width', function (l) { return 0.8 + 4 * Math.sqrt(l.abs / maxAbs); })
      .attr('fill', 'none').attr('marker-end', null);
    edgeSel.append('text').attr('class', 'sg-weight')
      .attr('x', function (l) { return gr.edge(l.source, l.target).x; })
      .attr('y', function (l) { return gr.edge(l.source, l.target).y; })
      .attr('dy', '0.35em').attr('text-anchor', 'middle')
      .style('fill', function (l) { return l.weight >= 0 ? POSITIVE : NEGATIVE; })
      .text(function (l) { return weightFormat(l.weight); });
    var nodeSel = svg.append('g').selectAll('g').data(pinned).join('g').attr('class', 'sg-node')
      .attr('transform', function (d) { var p = gr.node(d.id); return 'translate(' + (p.x - nodeW / 2) + ',' + (p.y - nodeH / 2) + ')'; })
      .classed('clicked', function (d) { return d.id === state.clickedId; })
      .on('click', function (ev, d) { state.clickedId = d.id; update(); });
    nodeSel.append('rect').attr('width', nodeW).attr('height', nodeH).attr('rx', 5)
      .attr('fill', '#fff').attr('stroke', fillFor);
    nodeSel.append('rect').attr('width', 6).attr('height', nodeH).attr('rx', 2).attr('fill', fillFor);
    nodeSel.append('text').attr('x', 12).attr('y', 14).attr('class', 'sg-label').text(shortLabel);
    nodeSel.append('text').attr('x', 12).attr('y', 28).attr('class', 'sg-sub')
      .text(function (d) {
        if (d.feature_type === 'logit') return 'p = ' + numberFormat(d.token_prob);
        return typeof d.ie === 'number' ? 'IE ' + weightFormat(d.ie) : '';
      });
  }

  // ---- legend, header ------------------------------------------------------------------------
  function drawLegend() {
    var data = state.data;
    var box = d3.select('#legend').html('');
    var items = [['resid', 'resid_pre SAE feature'], ['attn', 'attn_out SAE feature'], ['transcoder', 'transcoder feature']];
    items.forEach(function (it) {
      var span = box.append('span').attr('class', 'legend-item');
      span.append('span').attr('class', 'swatch').style('background', SITE_COLOUR[it[0]]);
      span.append('span').text(it[1]);
    });
    box.append('span').attr('class', 'legend-item').text('◆ error node (paler)   ■ metric (top) and roles (bottom)');
    box.append('span').attr('class', 'legend-item')
      .html('links: <span style="color:' + POSITIVE + '">positive</span> / <span style="color:' + NEGATIVE +
            '">negative</span>, in ' + escapeHtml(data.meta.weight_unit || 'the graph\'s units'));
    if (data.meta.info && data.meta.info.pruning) box.append('div').attr('class', 'legend-note').text('pruning: ' + data.meta.info.pruning);
  }

  function drawHeader() {
    var data = state.data;
    var info = data.meta.info || {};
    d3.select('#description').text((info.description || data.meta.slug) + (data.meta.prompt ? ' — first prompt: ' + data.meta.prompt.replace(/\n/g, ' ⏎ ').slice(0, 160) + '…' : ''));
    d3.select('#threshold').property('value', state.threshold);
    d3.select('#threshold-value').text(state.threshold.toFixed(2));
  }

  function update() {
    drawLinkGraph();
    drawDetail();
    drawConnections();
    drawSubgraph();
    saveUrl();
    window.__viewerReady = state.slug;
  }

  // ---- loading -------------------------------------------------------------------------------
  function loadGraph(slug, first) {
    window.__viewerReady = null;
    return d3.json('graph_data/' + encodeURIComponent(slug) + '.json').then(function (doc) {
      var data = prepare(doc);
      state.slug = slug;
      state.data = data;
      var fromUrl = first ? parseFloat(params.get('threshold')) : NaN;
      state.threshold = isFinite(fromUrl) ? fromUrl : Math.max(data.meta.node_threshold || 0, data.maxInfluence);
      state.threshold = Math.min(1, Math.max(0.05, Math.ceil(state.threshold * 100) / 100));
      var pins = first && params.get('pinnedIds') ? params.get('pinnedIds').split(',') : (data.qParams.pinnedIds || []);
      state.pinned = pins.filter(function (id) { return data.byId.has(id); });
      var clicked = first ? params.get('clickedId') : null;
      state.clickedId = clicked && data.byId.has(clicked) ? clicked : null;
      state.hoveredId = null;
      drawHeader();
      drawLegend();
      update();
    });
  }

  function init() {
    d3.json('data/graph-metadata.json').then(function (index) {
      state.graphs = index.graphs || [];
      if (!state.graphs.length) { d3.select('#description').text('No graphs to show.'); window.__viewerReady = 'empty'; return; }
      var wanted = params.get('slug');
      var slug = state.graphs.some(function (g) { return g.slug === wanted; }) ? wanted : state.graphs[0].slug;
      d3.select('#graph-select').selectAll('option').data(state.graphs).join('option')
        .attr('value', function (g) { return g.slug; })
        .property('selected', function (g) { return g.slug === slug; })
        .text(function (g) { return (g.title_prefix || g.slug); });
      d3.select('#graph-select').on('change', function () { loadGraph(this.value, false); });
      var slider = d3.select('#threshold');
      var redraw = debounce(function () { update(); }, 120);
      slider.on('input', function () {
        state.threshold = +this.value;
        d3.select('#threshold-value').text(state.threshold.toFixed(2));
        redraw();
      });
      d3.select('#pin-top').on('click', function () {
        var ranked = visibleNodes(state.data).filter(function (d) { return typeof d.influence === 'number'; })
          .sort(function (a, b) { return a.influence - b.influence; });
        var logit = state.data.nodes.filter(function (d) { return d.feature_type === 'logit'; });
        state.pinned = Array.from(new Set(state.pinned.concat(ranked.slice(0, PIN_TOP).concat(logit).map(function (d) { return d.id; }))));
        update();
      });
      d3.select('#clear-pins').on('click', function () { state.pinned = []; update(); });
      var lastWidth = window.innerWidth;
      window.addEventListener('resize', debounce(function () {
        if (state.data && window.innerWidth !== lastWidth) { lastWidth = window.innerWidth; update(); }
      }, 200));
      return loadGraph(slug, true);
    }).catch(function (err) {
      window.__viewerErrors.push('loading failed: ' + err);
      d3.select('#errors').style('display', 'block').text('Could not load the graphs: ' + err);
    });
  }

  function debounce(fn, ms) {
    var t = null;
    return function () { clearTimeout(t); t = setTimeout(fn, ms); };
  }

  window.iclViewer = {state: state, loadGraph: loadGraph, togglePin: togglePin, update: update};
  init();
})();
